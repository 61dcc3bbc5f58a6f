"""The multi-objective wrappers as optimizers: same trajectory as by hand, state, errors."""

import copy

import pytest
import torch
from torch import nn

from gradsurgery import (
    MGDA,
    GradientBank,
    GradVac,
    NonFiniteGradientError,
    ParetoLessForgetting,
    ParetoStationaryError,
    PCGrad,
    Uniform,
)
from gradsurgery.functional import (
    gradvac_weights,
    lfmlf_weights,
    mgda_weights,
    pcgrad_weights,
    uniform_weights,
)
from tests.helpers import batch_loss, flat_grad, mlp, params_equal, set_flat_grad
from tests.sync_guard import no_host_sync

LANGUAGES = ["en", "de", "fr"]


def language_losses(net: nn.Module, step: int) -> dict[str, torch.Tensor]:
    return {
        name: batch_loss(net, 100 * step + k, target_shift=1.5 * k - 1.0)
        for k, name in enumerate(LANGUAGES)
    }


def wrapped_step(opt, net, step):
    opt.zero_grad()
    opt.backward(language_losses(net, step))
    opt.step()


def by_hand(net, optimizer, step, weights_of):
    grads = torch.stack([flat_grad(net, loss) for loss in language_losses(net, step).values()])
    w = weights_of(grads.double())
    set_flat_grad(net, (grads.double().T @ w).to(grads.dtype))
    optimizer.step()


def sgd(net):
    return torch.optim.SGD(net.parameters(), lr=0.05)


def seeded():
    return torch.Generator().manual_seed(7)


def pcgrad_by_hand(reduction):
    generator = seeded()
    return lambda grads: pcgrad_weights(grads, generator, reduction)


def gradvac_by_hand():
    state = {"targets": None, "generator": seeded()}

    def weights(grads):
        w, state["targets"] = gradvac_weights(grads, state["targets"], 0.01, state["generator"])
        return w

    return weights


def lfmlf_by_hand():
    state = {"accumulated": None}

    def weights(grads):
        w = lfmlf_weights(grads, state["accumulated"])
        d = grads.T @ w
        state["accumulated"] = d if state["accumulated"] is None else state["accumulated"] + d
        return w

    return weights


CASES = {
    "uniform": (lambda net: Uniform(sgd(net), LANGUAGES), lambda: uniform_weights),
    "uniform_stats": (
        lambda net: Uniform(sgd(net), LANGUAGES, stats=True),
        lambda: uniform_weights,
    ),
    "mgda": (lambda net: MGDA(sgd(net), LANGUAGES), lambda: mgda_weights),
    "pcgrad": (
        lambda net: PCGrad(sgd(net), LANGUAGES, generator=seeded()),
        lambda: pcgrad_by_hand("sum"),
    ),
    "pcgrad_mean": (
        lambda net: PCGrad(sgd(net), LANGUAGES, reduction="mean", generator=seeded()),
        lambda: pcgrad_by_hand("mean"),
    ),
    "gradvac": (lambda net: GradVac(sgd(net), LANGUAGES, generator=seeded()), gradvac_by_hand),
    "lfmlf": (lambda net: ParetoLessForgetting(sgd(net), LANGUAGES), lfmlf_by_hand),
}


@pytest.mark.parametrize("case", CASES)
def test_trajectory_equals_combining_by_hand(case):
    make, by_hand_weights = CASES[case]
    net, ref = mlp(), mlp()
    opt, ref_opt, weights = make(net), sgd(ref), by_hand_weights()
    for step in range(6):
        wrapped_step(opt, net, step)
        by_hand(ref, ref_opt, step, weights)
        assert params_equal(net, ref), f"step {step}"
    stats = opt.last_stats.to_dict()
    assert all(isinstance(v, float) for v in stats.values())
    if case == "uniform":  # no Gram matrix: only what the step knows without one
        names = ["skipped", *(f"weight/{name}" for name in LANGUAGES)]
        assert stats == {f"uniform/{name}": 0.0 if name == "skipped" else 1 / 3 for name in names}
    else:
        assert any(key.startswith(f"{opt.stats_prefix}/dot/") for key in stats)


def test_per_parameter_gradvac_equals_gradvac_on_each_tensor():
    net = mlp()
    opt = GradVac(sgd(net), LANGUAGES, granularity="parameter", generator=seeded())
    opt.zero_grad()
    opt.backward(language_losses(net, 0))
    rows = [[p_row.clone() for p_row in opt.bank.row_views(k + 1)] for k in range(3)]
    opt.apply_surgery()
    generator = seeded()
    for i, p in enumerate(opt.bank.params):
        grads = torch.stack([rows[k][i].flatten() for k in range(3)]).double()
        # one generator draw per step is shared by all tensors: replay it for each
        w, _ = gradvac_weights(grads, None, 0.01, torch.Generator().manual_seed(7))
        torch.testing.assert_close(p.grad.flatten().double(), grads.T @ w, rtol=1e-5, atol=1e-7)
    del generator
    assert opt.targets.shape == (len(opt.bank.params), 3, 3)


def test_per_parameter_gradvac_reads_the_rows_once(monkeypatch):
    # its per-parameter Grams sum to the model's Gram: no second pass for the checks
    net = mlp()
    opt = GradVac(sgd(net), LANGUAGES, granularity="parameter", generator=seeded())
    calls = []
    for name in ("gram", "segment_gram"):
        original = getattr(GradientBank, name)

        def counted(self, *args, original=original, name=name, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(GradientBank, name, counted)
    opt.zero_grad()
    opt.backward(language_losses(net, 0))
    rows = opt.bank.blocks[0][1:].double().clone()
    opt.step()
    assert calls == ["segment_gram"]
    torch.testing.assert_close(opt.last_stats.gram.sum(dim=0), rows @ rows.T)


def test_lfmlf_accumulates_the_combined_directions():
    net = mlp()
    opt = ParetoLessForgetting(sgd(net), LANGUAGES)
    total = torch.zeros_like(opt.accumulated())
    for step in range(4):
        opt.zero_grad()
        opt.backward(language_losses(net, step))
        opt.apply_surgery()
        total += torch.cat([p.grad.flatten() for p in opt.bank.params])
        opt.step()
        torch.testing.assert_close(opt.accumulated(), total)
    stats = opt.last_stats
    assert not opt.stationary
    assert float(stats.extras["kkt_residual"]) <= 1e-6
    assert bool((stats.dots >= -1e-6 * stats.gram.abs().max()).all())


@pytest.mark.parametrize("case", ["lfmlf", "pcgrad", "gradvac"])
def test_save_and_resume_gives_the_uninterrupted_trajectory(case, tmp_path):
    make, _ = CASES[case]
    net = mlp()
    opt = make(net)
    for step in range(3):
        wrapped_step(opt, net, step)
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for step in range(3, 6):
        wrapped_step(opt, net, step)

    resumed = mlp(seed=99)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(checkpoint["opt"])
    for step in range(3, 6):
        wrapped_step(resumed_opt, resumed, step)
    assert params_equal(net, resumed, exact=True)


def stationary_setup(on_stationary):
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = ParetoLessForgetting(
        torch.optim.SGD([weight], lr=0.1), ["a", "b"], on_stationary=on_stationary
    )
    opt.zero_grad()
    # opposite gradients: 0 is in their convex hull, a Pareto-stationary point
    opt.backward({"a": weight.sum(), "b": -2 * weight.sum()})
    return weight, opt


def test_a_stationary_point_is_detected_and_skipped():
    weight, opt = stationary_setup("skip")
    before = weight.detach().clone()
    opt.step()
    assert opt.stationary
    assert opt.last_stats.skipped
    assert torch.equal(weight, before)
    assert bool((opt.accumulated() == 0).all())


def test_a_stationary_point_can_stop_training():
    weight, opt = stationary_setup("raise")
    before = weight.detach().clone()
    with pytest.raises(ParetoStationaryError, match="Pareto-stationary"):
        opt.step()
    assert torch.equal(weight, before)


def test_a_loss_that_does_not_reach_a_parameter_gives_zeros_in_its_row():
    trunk = nn.Linear(3, 3)
    heads = nn.ModuleDict({"en": nn.Linear(3, 1), "de": nn.Linear(3, 1)})
    params = [*trunk.parameters(), *heads.parameters()]
    opt = Uniform(torch.optim.SGD(params, lr=0.1), ["en", "de"])
    x = torch.randn(4, 3)
    opt.zero_grad()
    opt.backward({name: head(trunk(x)).sum() for name, head in heads.items()})
    en_row = dict(zip(map(id, opt.bank.params), opt.bank.row_views(1), strict=True))
    assert bool((en_row[id(heads["de"].weight)] == 0).all())
    assert bool((en_row[id(heads["en"].weight)] != 0).any())


def test_a_backward_outside_every_objective_is_an_error():
    net = mlp()
    opt = Uniform(sgd(net), LANGUAGES)
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    opt.backward(language_losses(net, 0))
    batch_loss(net, 5).backward()  # lands in .grad, where nothing reads it
    with pytest.raises(RuntimeError, match="outside every"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


def test_objective_routing_by_name_equals_backward_of_all():
    nets = mlp(), mlp()
    opts = [Uniform(sgd(net), LANGUAGES) for net in nets]
    losses = [language_losses(net, 0) for net in nets]
    opts[0].backward(losses[0])
    for name, loss in losses[1].items():
        with opts[1].objective(name):
            loss.backward()
    for opt in opts:
        opt.step()
    assert params_equal(*nets, exact=True)


@pytest.mark.parametrize(
    ("losses", "match"),
    [({"en": 1, "de": 2}, "losses are given"), ([1, 2], "2 losses for 3 objectives")],
)
def test_backward_needs_one_loss_per_objective(losses, match):
    opt = Uniform(sgd(mlp()), LANGUAGES)
    with pytest.raises(ValueError, match=match):
        opt.backward(losses)


def test_a_missing_objective_gradient_is_an_error():
    net = mlp()
    opt = MGDA(sgd(net), LANGUAGES)
    with opt.objective("en"):
        batch_loss(net, 0).backward()
    with pytest.raises(RuntimeError, match="'de', 'fr'"):
        opt.step()


@pytest.mark.parametrize("cls", [Uniform, MGDA, PCGrad, GradVac, ParetoLessForgetting])
def test_non_finite_gradients_raise_and_change_nothing(cls):
    net = mlp()
    opt = cls(sgd(net), LANGUAGES)
    before = [p.detach().clone() for p in net.parameters()]
    losses = language_losses(net, 0)
    losses["de"] = losses["de"] * float("inf")
    opt.backward(losses)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


class OnAccelerator(torch.Generator):
    """Stands for a CUDA generator, which cannot be made without a GPU."""

    @property
    def device(self):
        return torch.device("cuda")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: PCGrad(sgd(p), 2, reduction="max"), "reduction"),
        (lambda p: GradVac(sgd(p), 2, beta=2.0), "beta"),
        (lambda p: GradVac(sgd(p), 2, granularity="layer"), "granularity"),  # type: ignore[arg-type]
        (lambda p: ParetoLessForgetting(sgd(p), 2, on_stationary="warn"), "on_stationary"),  # type: ignore[arg-type]
        (lambda p: ParetoLessForgetting(sgd(p), 2, stationarity_tol=-1.0), "stationarity_tol"),
        (lambda p: ParetoLessForgetting(sgd(p), 2, solver="enumerate"), "qpsolvers backend"),
        (lambda p: MGDA(sgd(p), 2, solver="gurobi"), "not installed"),
        (lambda p: Uniform(sgd(p), 0), "at least 1"),
        (
            lambda p: PCGrad(sgd(p), 2, generator=OnAccelerator()),
            "CPU",
        ),
    ],
)
def test_bad_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make(mlp())


@pytest.mark.parametrize("cls", [Uniform, MGDA, PCGrad, GradVac])
def test_surgery_without_validation_does_not_synchronise(cls):
    net = mlp()
    opt = cls(sgd(net), LANGUAGES, validate=False)
    opt.zero_grad()
    opt.backward(language_losses(net, 0))
    with no_host_sync():
        opt.apply_surgery()
    opt.step()


def test_lfmlf_with_a_grad_scaler_follows_the_unscaled_trajectory():
    nets = mlp(), mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opts = [
        ParetoLessForgetting(sgd(nets[0]), LANGUAGES, grad_scaler=scaler),
        ParetoLessForgetting(sgd(nets[1]), LANGUAGES),
    ]
    for step in range(3):
        opts[0].zero_grad()
        opts[0].backward({k: scaler.scale(v) for k, v in language_losses(nets[0], step).items()})
        scaler.step(opts[0])
        scaler.update()
        wrapped_step(opts[1], nets[1], step)
        assert params_equal(*nets)
    torch.testing.assert_close(opts[0].accumulated(), opts[1].accumulated())


def test_a_frozen_copy_of_the_state_is_independent():
    net = mlp()
    opt = ParetoLessForgetting(sgd(net), LANGUAGES)
    wrapped_step(opt, net, 0)
    saved = copy.deepcopy(opt.state_dict())
    wrapped_step(opt, net, 1)
    entry = saved["gradsurgery"][-1]
    assert entry["wrapper"] == "ParetoLessForgetting"
    assert not torch.equal(
        torch.cat([v.flatten() for v in entry["accumulated"].values()]), opt.accumulated()
    )


@pytest.mark.parametrize("cls", [Uniform, PCGrad, MGDA])
def test_a_head_no_objective_reaches_is_not_stepped_and_per_language_heads_are(cls):
    torch.manual_seed(0)
    body = nn.Linear(4, 5)
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(3)])  # head 2: no objective
    opt = cls(
        torch.optim.AdamW([*body.parameters(), *heads.parameters()], lr=0.1, weight_decay=0.5),
        ["en", "de"],
    )
    unused = [p.detach().clone() for p in heads[2].parameters()]
    used = [p.detach().clone() for p in heads[1].parameters()]
    for step in range(3):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
        h = torch.tanh(body(x))
        opt.zero_grad()
        opt.backward({"en": heads[0](h).square().mean(), "de": (heads[1](h) - 1).square().mean()})
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(heads[2].parameters(), unused, strict=True))
    assert not any(torch.equal(p, q) for p, q in zip(heads[1].parameters(), used, strict=True))

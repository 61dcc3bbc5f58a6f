"""PhasedLR: each set moves by lr·K, K as in Guo et al. 2023, with schedulers, wrappers, resumes."""

import copy
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LambdaLR

from gradsurgery import (
    CKAMonitor,
    GEMProjector,
    LayerSets,
    NonFiniteGradientError,
    Phase,
    PhasedLR,
)
from gradsurgery.functional import gem_project
from gradsurgery.wrappers.phased import GROUP_KEY
from tests.encoders import bert, one_thread, tagging_loss
from tests.helpers import flat_grad, set_flat_grad
from tests.sync_guard import no_host_sync

# With W = 2 and δ = 0.1: P1 for seven steps, then P2 with R(φ) between 0 and 1.
OBSERVED = [2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.45, 0.45, 0.44, 0.43, 0.43, 0.43]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def spec_multipliers(observed, window=2, threshold=0.1, exponent=3.0, c1=0.01, c2=10.0):
    """K of each role after the losses ``observed``, from the table of docs/phased_lr.md."""
    phase_one = len(observed) < 2 * window
    if not phase_one:
        recent = np.mean(observed[-window:])
        previous = np.mean(observed[-2 * window : -window])
        phase_one = previous - recent > threshold
    if phase_one:
        return {"S_I": c1, "S_II": c1, "V_I": 1.0, "V_II": 1.0, "other": 1.0}
    adaptive = max(1.0 - (recent / previous) ** exponent, 0.0)
    return {"S_I": 1.0, "S_II": adaptive, "V_I": 1.0, "V_II": c2 or 1.0, "other": 1.0}


def sgd_step_moves_each_set_by_lr_k_grad(opt, model, step, lr):
    """One step of ``opt`` (PhasedLR over SGD); check Δθ = −lr·K·g for every parameter."""
    opt.zero_grad()
    tagging_loss(model, step).backward()
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in model.named_parameters()}
    opt.observe(OBSERVED[step])
    opt.step()
    k = spec_multipliers(OBSERVED[: step + 1])
    assert opt.last_stats.multipliers == pytest.approx(
        {r: k[r] for r in ("S_I", "S_II", "V_I", "V_II")}
    )
    for name, p in model.named_parameters():
        value, grad = before[name]
        expected = -lr * k[opt.sets.roles[name]] * grad
        torch.testing.assert_close(p.detach() - value, expected, rtol=1e-9, atol=1e-15)


def test_each_set_moves_by_lr_times_k_times_the_gradient():
    model = bert(12).double()
    opt = PhasedLR(torch.optim.SGD(model.parameters(), lr=0.5), model, window=2)
    phases = []
    for step in range(len(OBSERVED)):
        sgd_step_moves_each_set_by_lr_k_grad(opt, model, step, lr=0.5)
        phases.append(opt.last_stats.phase)
    assert phases == [Phase.P1] * 7 + [Phase.P2] * 5
    assert 0 < opt.last_stats.adaptive_multiplier < 1


SCHEDULERS = {
    "lambda": lambda o: LambdaLR(o, lambda step: 0.7**step),
    "cosine": lambda o: CosineAnnealingLR(o, T_max=8),
    "exponential": lambda o: ExponentialLR(o, gamma=0.8),  # recomputes from the group's lr
}


@pytest.mark.parametrize("make", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_the_scheduler_gives_the_base_and_k_never_compounds(make):
    model = bert(12).double()
    opt = PhasedLR(torch.optim.SGD(model.parameters(), lr=0.5), model, window=2)
    scheduler = make(opt)
    plain = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    plain_scheduler = make(plain)
    for step in range(len(OBSERVED)):
        lr = plain.param_groups[0]["lr"]
        assert [group["lr"] for group in opt.param_groups] == [lr] * len(opt.param_groups)
        sgd_step_moves_each_set_by_lr_k_grad(opt, model, step, lr)
        plain.step()
        scheduler.step()
        plain_scheduler.step()
    assert [group["lr"] for group in opt.param_groups] == [plain.param_groups[0]["lr"]] * 5


def test_per_group_lambdas_on_the_split_groups():
    model = bert(12).double()
    opt = PhasedLR(torch.optim.SGD(model.parameters(), lr=1.0), model, window=2)
    factor = {"other": 1.0, "S_I": 0.5, "S_II": 0.25, "V_I": 2.0, "V_II": 4.0}
    scheduler = LambdaLR(
        opt, [lambda s, f=factor[g[GROUP_KEY]]: f * 0.9**s for g in opt.param_groups]
    )
    for step in range(3):
        opt.zero_grad()
        tagging_loss(model, step).backward()
        opt.observe(OBSERVED[step])
        opt.step()
        scheduler.step()
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(factor[group[GROUP_KEY]] * 0.9**3, rel=1e-15)


# -- any inner optimizer, and the other wrappers -------------------------------------------


def groups_by_role(model):
    sets = LayerSets.from_model(model)
    by_role = defaultdict(list)
    for name, p in model.named_parameters():
        by_role[sets.roles[name]].append(p)
    return [{"params": params, "role": role} for role, params in by_role.items()]


def by_hand_step(optimizer, k):
    """Scale each group's lr by K, step, put the lr back: what PhasedLR does, written out."""
    base = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * k[group["role"]]
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["lr"] = lr


OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "adam_foreach": lambda params: torch.optim.Adam(params, lr=0.01, foreach=True),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.1),
}


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_any_inner_optimizer_follows_the_by_hand_trajectory(make):
    model, ref = bert(12).double(), bert(12).double()
    opt = PhasedLR(make(model.parameters()), model, window=2)
    ref_opt = make(groups_by_role(ref))
    for step in range(len(OBSERVED)):
        for net in (model, ref):
            net.zero_grad()
            tagging_loss(net, step).backward()
        opt.observe(OBSERVED[step])
        opt.step()
        by_hand_step(ref_opt, spec_multipliers(OBSERVED[: step + 1]))
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "lr", [1e-3, torch.tensor(1e-3, dtype=torch.float64)], ids=["float", "tensor"]
)
def test_adam_steps_of_the_slowed_sets_are_c1_times_smaller(lr):
    """Adam's first step is ≈ lr·sign(g): only a scaled *rate* makes S_I's step c1 times smaller."""
    model = bert(12).double()
    inner = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-20, foreach=False)
    opt = PhasedLR(inner, model, window=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tagging_loss(model, 0).backward()
    # attention key biases get a gradient of rounding noise only (softmax ignores them)
    moved = [name for name, p in model.named_parameters() if float(p.grad.abs().max()) > 1e-12]
    opt.observe(1.0)
    opt.step()
    parameters = dict(model.named_parameters())
    for name in moved:
        largest = float((parameters[name].detach() - before[name]).abs().max())
        k = 0.01 if opt.sets.roles[name] in ("S_I", "S_II") else 1.0
        assert largest == pytest.approx(k * 1e-3, rel=1e-6), name
    assert len(moved) > len(parameters) * 0.8
    assert all(group["lr"] is lr for group in opt.param_groups)  # the same object is back


def gem_by_hand_step(ref, ref_opt, step, k):
    g = flat_grad(ref, tagging_loss(ref, step))
    memory = flat_grad(ref, tagging_loss(ref, step, shift=1))
    set_flat_grad(ref, gem_project(g, memory[None]))
    by_hand_step(ref_opt, k)


def test_over_gem_projector_equals_both_by_hand_in_either_order():
    model, swapped, ref = bert(12).double(), bert(12).double(), bert(12).double()
    gem = GEMProjector(torch.optim.AdamW(model.parameters(), lr=0.01), margin=0.0)
    opt = PhasedLR(gem, model, window=2)
    inner_phased = PhasedLR(torch.optim.AdamW(swapped.parameters(), lr=0.01), swapped, window=2)
    outer_gem = GEMProjector(inner_phased, margin=0.0)
    ref_opt = torch.optim.AdamW(groups_by_role(ref), lr=0.01)
    projected = 0
    for step in range(len(OBSERVED)):
        for net, surgery, phased, outer in (
            (model, gem, opt, opt),
            (swapped, outer_gem, inner_phased, outer_gem),
        ):
            outer.zero_grad()
            tagging_loss(net, step).backward()
            with surgery.constraint():
                tagging_loss(net, step, shift=1).backward()
            phased.observe(OBSERVED[step])
            outer.step()
        projected += int(gem.last_stats.projected)
        gem_by_hand_step(ref, ref_opt, step, spec_multipliers(OBSERVED[: step + 1]))
        for p, q, r in zip(model.parameters(), swapped.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(q, r, rtol=1e-9, atol=1e-10)
    assert projected > 0


# -- groups ----------------------------------------------------------------------------------

ROLE_ORDER = ["other", "S_I", "S_II", "V_II", "V_I"]  # first appearance in BERT's names


def decay_groups(model, lr=0.01):
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def snapshot_groups(optimizer):
    return [
        {key: [id(p) for p in v] if key == "params" else v for key, v in group.items()}
        for group in optimizer.param_groups
    ]


def test_mixed_groups_are_split_by_role_keeping_their_settings():
    model = bert(12)
    inner = torch.optim.AdamW(decay_groups(model), lr=0.01)
    before = snapshot_groups(inner)
    opt = PhasedLR(inner, model)
    assert [(g[GROUP_KEY], g["weight_decay"]) for g in opt.param_groups] == [
        (role, 0.01) for role in ROLE_ORDER
    ] + [(role, 0.0) for role in ROLE_ORDER]
    for original, pieces in zip(before, (opt.param_groups[:5], opt.param_groups[5:]), strict=True):
        ids = [id(p) for piece in pieces for p in piece["params"]]
        assert sorted(ids) == sorted(original["params"])
        for piece in pieces:
            assert {opt.sets.role(p) for p in piece["params"]} == {piece[GROUP_KEY]}
            order = [original["params"].index(id(p)) for p in piece["params"]]
            assert order == sorted(order)
    assert opt.param_groups is inner.param_groups


def test_a_group_of_one_role_is_only_labelled():
    model = bert(12)
    attention = list(model.bert.encoder.layer[11].attention.parameters())
    inner = torch.optim.SGD([{"params": attention}], lr=0.1)
    scheduler = LambdaLR(inner, lambda step: 0.5)  # before PhasedLR: fine, nothing to split
    opt = PhasedLR(inner, model)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == attention
    assert opt.param_groups[0][GROUP_KEY] == "V_II"
    opt.observe(1.0)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.05


def test_add_param_group_splits_the_same_way():
    model = bert(12)
    lower = [
        p for n, p in model.named_parameters() if ".layer.1" not in n and "classifier" not in n
    ]
    upper = [p for n, p in model.named_parameters() if ".layer.1" in n or "classifier" in n]
    gem = GEMProjector(torch.optim.SGD(lower, lr=0.1), margin=0.0)
    opt = PhasedLR(gem, model)
    count = len(opt.param_groups)
    opt.add_param_group({"params": upper, "lr": 0.05})
    added = opt.param_groups[count:]
    assert [g[GROUP_KEY] for g in added] == ["S_I", "S_II", "V_II", "V_I", "other"]
    assert all(g["lr"] == 0.05 for g in added)
    assert gem.bank.numel == sum(p.numel() for p in model.parameters())
    before = snapshot_groups(opt)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [model.classifier.weight, *lower[-3:]]})
    assert snapshot_groups(opt) == before


def test_a_group_added_behind_phased_lrs_back_is_refused():
    model = bert(12)
    layer = model.bert.encoder.layer
    opt = PhasedLR(torch.optim.SGD(layer[0].parameters(), lr=0.1), model)
    opt.optimizer.add_param_group({"params": layer[11].parameters()})
    opt.observe(1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"through PhasedLR\.add_param_group"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


# -- observing -------------------------------------------------------------------------------


def test_a_step_without_an_observation_raises_and_changes_nothing():
    model = bert(12)
    opt = PhasedLR(torch.optim.Adam(model.parameters(), lr=0.01), model)
    for attempt in range(2):
        tagging_loss(model, attempt).backward()
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.optimizer.state_dict()["state"])
        with pytest.raises(RuntimeError, match=r"call opt.observe\(loss\)"):
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        assert opt.optimizer.state_dict()["state"].keys() == state.keys()
        opt.observe(2.0)
        opt.observe(1.5)  # several observations before a step all count
        opt.step()
    assert opt.detector.observations == 4


@pytest.mark.parametrize(
    "loss", [float("nan"), float("inf"), -1.0, torch.tensor([1.0, 2.0])], ids=repr
)
def test_a_bad_loss_is_refused_and_not_recorded(loss):
    model = bert(12)
    opt = PhasedLR(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="loss must be"):
        opt.observe(loss)
    assert opt.detector.observations == 0
    with pytest.raises(RuntimeError, match="no loss observed"):
        opt.step()


def test_the_closure_may_observe():
    model = bert(12).double()
    opt = PhasedLR(torch.optim.SGD(model.parameters(), lr=0.1), model, window=2)

    def closure():
        opt.zero_grad()
        loss = tagging_loss(model, 0)
        loss.backward()
        opt.observe(loss)
        return loss

    loss = opt.step(closure)
    assert opt.detector.observations == 1 and loss.item() > 0


def test_a_step_reads_nothing_back_to_the_host():
    model = bert(12)
    opt = PhasedLR(torch.optim.SGD(model.parameters(), lr=0.1), model, window=1)
    for step in range(3):
        opt.zero_grad()
        loss = tagging_loss(model, step)
        loss.backward()
        opt.observe(loss)  # the one read the decision needs
        with no_host_sync():
            opt.step()
    assert opt.last_stats.observations == 3


def test_a_failed_inner_step_restores_the_rates_and_keeps_the_observation():
    model = bert(12)
    gem = GEMProjector(torch.optim.SGD(model.parameters(), lr=0.1), margin=0.0)
    opt = PhasedLR(gem, model)
    opt.zero_grad()
    (tagging_loss(model, 0) + float("nan") * model.classifier.weight.sum()).backward()
    with gem.constraint():
        tagging_loss(model, 0, shift=1).backward()
    opt.observe(1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert [g["lr"] for g in opt.param_groups] == [0.1] * len(opt.param_groups)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    opt.zero_grad()
    tagging_loss(model, 0).backward()
    with gem.constraint():
        tagging_loss(model, 0, shift=1).backward()
    opt.step()  # the observation is still there
    assert opt.last_stats.observations == 1
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


# -- policy IV -------------------------------------------------------------------------------


def test_without_c2_the_attention_of_the_last_layers_keeps_its_rate():
    model = bert(12)
    opt = PhasedLR(torch.optim.SGD(model.parameters(), lr=0.1), model, c2=None, window=2)
    for step, observed in enumerate(OBSERVED):
        opt.observe(observed)
        opt.step()
        assert opt.last_stats.multipliers == pytest.approx(
            {
                role: k
                for role, k in spec_multipliers(OBSERVED[: step + 1], c2=None).items()
                if role != "other"
            }
        )
        assert not opt.last_stats.c2_applied
    assert opt.last_stats.phase is Phase.P2


def test_the_cka_monitor_decides_when_c2_applies():
    generator = torch.Generator().manual_seed(0)
    before, noise = torch.randn(32, 6, generator=generator), torch.randn(32, 6, generator=generator)
    monitor = CKAMonitor(window=2)
    model = bert(12)
    opt = PhasedLR(torch.optim.SGD(model.parameters(), lr=0.1), model, window=2, similarity=monitor)
    scales = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.6, 1.6, 1.6, 1.6]  # drifts, then settles
    applied = []
    for observed, scale in zip(OBSERVED, scales, strict=True):
        similarity = opt.similarity.observe(before + scale * noise, before)
        opt.observe(observed)
        opt.step()
        stats = opt.last_stats
        expected = stats.phase is Phase.P2 and monitor.dropping
        assert stats.c2_applied == expected and stats.similarity == similarity
        assert stats.multipliers["V_II"] == (10.0 if expected else 1.0)
        if stats.phase is Phase.P2:
            applied.append(expected)
    assert True in applied and False in applied


# -- statistics, settings, saving ------------------------------------------------------------


def test_stats_are_loggable():
    model = bert(12)
    opt = PhasedLR(torch.optim.SGD(model.parameters(), lr=0.1), model, window=2)
    opt.observe(3.0)
    opt.step()
    logged = opt.last_stats.to_dict()
    assert set(logged) == {
        "phased/phase",
        "phased/ratio",
        "phased/adaptive_multiplier",
        "phased/c2_applied",
        "phased/similarity",
        "phased/multiplier/S_I",
        "phased/multiplier/S_II",
        "phased/multiplier/V_I",
        "phased/multiplier/V_II",
    }
    assert logged["phased/phase"] == 1.0 and logged["phased/multiplier/S_II"] == 0.01
    assert np.isnan(logged["phased/ratio"]) and np.isnan(logged["phased/similarity"])
    for observed in (3.0, 3.0, 3.0):
        opt.observe(observed)
        opt.step()
    logged = opt.last_stats.to_dict()
    assert (logged["phased/phase"], logged["phased/ratio"]) == (2.0, 1.0)
    assert logged["phased/multiplier/V_II"] == 10.0 and logged["phased/c2_applied"] == 1.0


def test_repr_shows_the_settings_and_the_inner_optimizer():
    model = bert(12)
    text = repr(PhasedLR(torch.optim.SGD(model.parameters(), lr=0.1), model, c2=None))
    assert text.startswith(
        "PhasedLR(c1=0.01, c2=None, window=100, threshold=0.1, exponent=3.0, similarity=None, "
        "sets=LayerSets(layout='bert', num_layers=12, location='bert.encoder.layer.{i}'),"
    )
    assert "optimizer=SGD (" in text


def test_save_and_resume_mid_window_gives_the_same_multipliers_and_trajectory(tmp_path):
    observed = [3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.95, 0.95, 0.95, 0.94, 0.94]

    def make(model):
        opt = PhasedLR(torch.optim.AdamW(model.parameters(), lr=0.01), model, window=3)
        return opt, LambdaLR(opt, lambda step: 0.9**step)

    def train(model, opt, scheduler, steps):
        stats = []
        for step in steps:
            opt.zero_grad()
            tagging_loss(model, step).backward()
            opt.observe(observed[step])
            opt.step()
            scheduler.step()
            stats.append(opt.last_stats)
        return stats

    model = bert(12)
    opt, scheduler = make(model)
    train(model, opt, scheduler, range(7))  # mid-window: 7 = 2·3 + 1
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()},
        tmp_path / "checkpoint.pt",
    )
    uninterrupted = train(model, opt, scheduler, range(7, 14))

    resumed = bert(12, seed=1)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt, resumed_scheduler = make(resumed)
    resumed_opt.load_state_dict(checkpoint["opt"])
    resumed_scheduler.load_state_dict(checkpoint["sched"])
    assert resumed_opt.detector.observations == 7
    assert train(resumed, resumed_opt, resumed_scheduler, range(7, 14)) == uninterrupted
    assert {stats.phase for stats in uninterrupted} == {Phase.P1, Phase.P2}
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters(), strict=True)
    )


def test_loading_an_incompatible_state_dict_changes_nothing():
    model = bert(12)
    opt = PhasedLR(torch.optim.Adam(model.parameters(), lr=0.01), model, window=3)
    for observed in (2.0, 1.0):
        tagging_loss(model, 0).backward()
        opt.observe(observed)
        opt.step()
    before = (copy.deepcopy(opt.state_dict()), snapshot_groups(opt))
    other_model = bert(12)
    others = {
        "with a CKA monitor": PhasedLR(
            torch.optim.Adam(other_model.parameters()),
            other_model,
            window=3,
            similarity=CKAMonitor(),
        ),
        "window": PhasedLR(torch.optim.Adam(model.parameters()), model, window=4),
        "GEMProjector": GEMProjector(torch.optim.Adam(model.parameters()), margin=0.0),
    }
    for message, other in others.items():
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(other.state_dict())
    state, groups = before
    assert opt.detector.state_dict() == state["gradsurgery"][-1]["detector"]
    assert snapshot_groups(opt) == groups


# -- bad settings change nothing -------------------------------------------------------------

BAD_SETTINGS = [
    ({"c1": -0.1}, r"c1 must be a finite number ≥ 0 and ≤ 1"),
    ({"c1": 1.5}, r"c1 must be a finite number ≥ 0 and ≤ 1"),
    ({"c1": float("nan")}, r"c1 must be"),
    ({"c2": 0.5}, r"c2 \(or None\) must be a finite number ≥ 1"),
    ({"c2": float("inf")}, r"c2 \(or None\) must be"),
    ({"c2": "10"}, r"c2 \(or None\) must be"),
    ({"window": 0}, "window must be a positive int"),
    ({"threshold": -1.0}, "threshold must be a finite number ≥ 0"),
    ({"exponent": 0.0}, "exponent must be a finite number > 0"),
    ({"layout": "distilbert"}, r"distilbert layout expects parameters named like 'transformer"),
    ({"c2": None, "similarity": CKAMonitor()}, "it needs c2"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_bad_settings_say_what_is_allowed_and_change_nothing(settings, message):
    model = bert(12)
    inner = torch.optim.AdamW(decay_groups(model))
    before = snapshot_groups(inner)
    with pytest.raises(ValueError, match=message):
        PhasedLR(inner, model, **settings)
    assert snapshot_groups(inner) == before


def test_refused_stacks_and_sets():
    model = bert(12)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    LambdaLR(inner, lambda step: 1.0)
    before = snapshot_groups(inner)
    with pytest.raises(ValueError, match="create the scheduler after PhasedLR"):
        PhasedLR(inner, model)
    assert snapshot_groups(inner) == before
    copied = copy.deepcopy(model)
    with pytest.raises(ValueError, match="another model, or a copy"):
        PhasedLR(torch.optim.SGD(copied.parameters(), lr=0.1), LayerSets.from_model(model))
    with pytest.raises(ValueError, match="layout applies when a model is passed"):
        PhasedLR(torch.optim.SGD(model.parameters()), LayerSets.from_model(model), layout="bert")
    with pytest.raises(ValueError, match="cannot wrap another PhasedLR"):
        PhasedLR(PhasedLR(torch.optim.SGD(model.parameters(), lr=0.1), model), model)
    with pytest.raises(ValueError, match="cannot wrap L-BFGS"):
        PhasedLR(torch.optim.LBFGS(model.parameters()), model)
    with pytest.raises(TypeError, match="sets must be LayerSets or a model"):
        PhasedLR(torch.optim.SGD(model.parameters()), "bert")
    with pytest.raises(TypeError, match="similarity must be a CKAMonitor"):
        PhasedLR(torch.optim.SGD(model.parameters()), model, similarity=0.5)

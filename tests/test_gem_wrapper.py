"""GEMProjector as a torch.optim.Optimizer: same trajectory as doing it by hand, and
everything a training loop does with an optimizer."""

import copy

import pytest
import torch
from torch import nn

from gradsurgery import MGDA, GEMProjector, NonFiniteGradientError
from gradsurgery.functional import gem_project
from tests.helpers import (
    backward_all,
    batch_loss,
    memory_loss,
    mlp,
    params_equal,
    reference_step,
    task_loss,
    wrapped_step,
)
from tests.sync_guard import no_host_sync

NAMES = ["mlm", "xsr"]

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "adam_foreach": lambda params: torch.optim.Adam(params, lr=0.01, foreach=True),
}


def constrained_run(steps: int = 6):
    return [(step, len(NAMES)) for step in range(steps)]


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("mode", ["gem", "agem"])
@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_trajectory_equals_projecting_by_hand(make, mode, margin):
    net, ref = mlp(), mlp()
    opt = GEMProjector(make(net.parameters()), margin, constraints=NAMES, mode=mode)
    ref_opt = make(ref.parameters())
    projected = 0
    for step in range(8):
        wrapped_step(opt, net, step, NAMES)
        reference_step(ref, ref_opt, step, len(NAMES), margin=margin, mode=mode)
        projected += int(opt.last_stats.projected)
        assert params_equal(net, ref)
    assert projected > 0  # the run exercises the projection, not only the pass-through


def test_the_memory_losses_do_not_increase_to_first_order():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=1e-3), margin=0.0, constraints=NAMES)
    for step in range(5):
        wrapped_step(opt, net, step, NAMES)
        stats = opt.last_stats
        assert torch.all(stats.dots_after >= -1e-7 * stats.grad_norm * stats.dots.abs().max())
        if bool(stats.projected):
            assert float(stats.dots.min()) < 0
            assert float(stats.change_norm) > 0


def test_stats_are_consistent_and_loggable():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    assert opt.last_stats is None
    opt.zero_grad()
    task_loss(net, 0).backward()
    g = torch.cat([p.grad.flatten() for p in net.parameters()]).clone()
    for k, name in enumerate(NAMES):
        with opt.constraint(name):
            memory_loss(net, 0, k).backward()
    J = opt.bank.blocks[0][1:].clone()
    stats = opt.apply_surgery()
    x = torch.cat([p.grad.flatten() for p in net.parameters()])
    torch.testing.assert_close(x, gem_project(g, J))
    torch.testing.assert_close(stats.dots, (J @ g).double())
    torch.testing.assert_close(stats.dots_after, (J.double() @ x.double()), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.change_norm, (x - g).norm().double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(stats.projected_norm, x.norm().double(), rtol=1e-5, atol=1e-7)
    logged = stats.to_dict()
    assert set(logged) >= {"gem/projected", "gem/dot/mlm", "gem/multiplier/xsr", "gem/skipped"}
    assert all(isinstance(value, float) for value in logged.values())
    opt.step()
    assert opt.last_stats is stats


def test_a_scheduler_drives_the_learning_rate():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=1.0), margin=0.0, constraints=NAMES)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for step in range(4):
        wrapped_step(opt, net, step, NAMES)
        scheduler.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 ** (step + 1))
        assert opt.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups is opt.optimizer.param_groups


def test_scheduled_trajectory_equals_the_reference():
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.2), margin=0.0, constraints=NAMES)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5) for o in (opt, ref_opt)]
    for step in range(5):
        wrapped_step(opt, net, step, NAMES)
        reference_step(ref, ref_opt, step, len(NAMES))
        for scheduler in schedulers:
            scheduler.step()
        assert params_equal(net, ref)


def test_save_and_resume_gives_the_uninterrupted_trajectory(tmp_path):
    def make(net):
        inner = torch.optim.AdamW(net.parameters(), lr=0.02)
        opt = GEMProjector(inner, 0.1, constraints=NAMES)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    net = mlp()
    opt, scheduler = make(net)
    for step in range(4):
        wrapped_step(opt, net, step, NAMES)
        scheduler.step()
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {"model": net.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()},
        path,
    )
    for step in range(4, 8):
        wrapped_step(opt, net, step, NAMES)
        scheduler.step()

    resumed = mlp(seed=123)
    checkpoint = torch.load(path, weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt, resumed_scheduler = make(resumed)
    resumed_opt.load_state_dict(checkpoint["opt"])
    resumed_scheduler.load_state_dict(checkpoint["sched"])
    for step in range(4, 8):
        wrapped_step(resumed_opt, resumed, step, NAMES)
        resumed_scheduler.step()
    assert params_equal(net, resumed, exact=True)


def test_state_dict_is_the_inner_one_plus_the_wrappers_entry():
    net = mlp()
    opt = GEMProjector(torch.optim.Adam(net.parameters()), margin=0.0, constraints=NAMES)
    wrapped_step(opt, net, 0, NAMES)
    state = opt.state_dict()
    inner = opt.optimizer.state_dict()
    assert state["param_groups"] == inner["param_groups"]
    assert state["state"].keys() == inner["state"].keys()
    assert state["gradsurgery"] == [{"wrapper": "GEMProjector", "rows": NAMES}]


def test_loading_an_incompatible_state_dict_changes_nothing():
    net = mlp()
    opt = GEMProjector(torch.optim.Adam(net.parameters()), margin=0.0, constraints=NAMES)
    wrapped_step(opt, net, 0, NAMES)
    before = snapshot(net, opt)
    other = MGDA(torch.optim.Adam(mlp().parameters(), lr=0.5), objectives=["mlm"])
    with pytest.raises(ValueError, match="saved from a MGDA"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="plain optimizer"):
        opt.load_state_dict(other.optimizer.state_dict())
    assert_unchanged(net, opt, before)


def test_gradient_accumulation_over_micro_batches():
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    ref_opt = GEMProjector(torch.optim.SGD(ref.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    for step in range(3):
        opt.zero_grad()
        for micro in range(2):
            (task_loss(net, 2 * step + micro) / 2).backward()
            for k, name in enumerate(NAMES):
                with opt.constraint(name):
                    (memory_loss(net, 2 * step + micro, k) / 2).backward()
        opt.step()
        ref_opt.zero_grad()
        (sum(task_loss(ref, 2 * step + m) for m in range(2)) / 2).backward()
        for k, name in enumerate(NAMES):
            with ref_opt.constraint(name):
                (sum(memory_loss(ref, 2 * step + m, k) for m in range(2)) / 2).backward()
        ref_opt.step()
        assert params_equal(net, ref)


def test_clipping_after_the_projection():
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.5), margin=0.0, constraints=NAMES)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(4):
        opt.zero_grad()
        backward_all(opt, net, step, NAMES)
        opt.apply_surgery()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
        opt.step()

        def project_and_clip(g, J):
            x = gem_project(g, J)
            return x * min(1.0, 0.05 / (float(x.norm()) + 1e-6))

        reference_step(ref, ref_opt, step, len(NAMES), project=project_and_clip)
        assert params_equal(net, ref)


def test_closure_is_called_once_before_the_step():
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        return backward_all(opt, net, 0, NAMES)

    loss = opt.step(closure)
    reference_step(ref, ref_opt, 0, len(NAMES))
    assert calls == [1]
    assert float(loss.detach()) == pytest.approx(float(task_loss(mlp(), 0).detach()))
    assert params_equal(net, ref)


def test_frozen_parameters_stay_frozen_and_unfreezing_works():
    net, ref = mlp(), mlp()
    for model in (net, ref):
        model[0].requires_grad_(False)
    opt = GEMProjector(torch.optim.Adam(net.parameters(), lr=0.01), margin=0.0, constraints=NAMES)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    frozen = net[0].weight.clone()
    for step in range(3):
        wrapped_step(opt, net, step, NAMES)
        reference_step(ref, ref_opt, step, len(NAMES))
        assert params_equal(net, ref)
    assert torch.equal(net[0].weight, frozen)
    assert net[0].weight.grad is None
    for model in (net, ref):
        model[0].requires_grad_(True)
    for step in range(3, 6):
        wrapped_step(opt, net, step, NAMES)
        reference_step(ref, ref_opt, step, len(NAMES))
        assert params_equal(net, ref)
    assert not torch.equal(net[0].weight, frozen)


def test_add_param_group_joins_the_projection():
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net[0].parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    ref_opt = torch.optim.SGD(ref[0].parameters(), lr=0.1)
    opt.add_param_group({"params": net[2].parameters(), "lr": 0.05})
    ref_opt.add_param_group({"params": ref[2].parameters(), "lr": 0.05})
    assert len(opt.param_groups) == 2
    assert opt.bank.numel == sum(p.numel() for p in net.parameters())
    for step in range(3):
        wrapped_step(opt, net, step, NAMES)
        reference_step(ref, ref_opt, step, len(NAMES))
        assert params_equal(net, ref)


def test_model_zero_grad_instead_of_the_optimizers():
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(4):
        net.zero_grad(set_to_none=True)  # breaks the views; the wrapper re-binds them
        backward_all(opt, net, step, NAMES)
        opt.step()
        reference_step(ref, ref_opt, step, len(NAMES))
        assert params_equal(net, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_parameter_dtypes(dtype):
    net, ref = mlp(dtype=dtype), mlp(dtype=dtype)
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.05), margin=0.0, constraints=NAMES)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(3):
        wrapped_step(opt, net, step, NAMES)
        reference_step(ref, ref_opt, step, len(NAMES))
        for p, q in zip(net.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(
                p,
                q,
                rtol=1e-2 if dtype == torch.bfloat16 else 1e-10,
                atol=1e-2 if dtype == torch.bfloat16 else 1e-12,
            )


def test_mixed_parameter_dtypes_are_projected_together():
    net = mlp()
    net[2].to(torch.float64)
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    assert len(opt.bank.blocks) == 2
    opt.zero_grad()
    x = torch.randn(4, 6)

    def forward(inputs):
        return net[2](net[1](net[0](inputs)).double())

    forward(x).sum().backward()
    g = torch.cat([p.grad.double().flatten() for p in net.parameters()])
    rows = []
    for k, name in enumerate(NAMES):
        with opt.constraint(name):
            (-(k + 1) * forward(x + k).sum()).backward()
        rows.append(torch.cat([b[k + 1].double() for b in opt.bank.blocks]))
    opt.apply_surgery()
    x_proj = torch.cat([p.grad.double().flatten() for p in net.parameters()])
    expected = gem_project(g, torch.stack(rows))
    torch.testing.assert_close(x_proj, expected, rtol=1e-5, atol=1e-6)


# -- bad input changes nothing ------------------------------------------------------------


def snapshot(net: nn.Module, opt: GEMProjector):
    params = [p.detach().clone() for p in net.parameters()]
    return params, copy.deepcopy(opt.optimizer.state_dict())


def assert_unchanged(net, opt, before):
    params, state = before
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params, strict=True))
    now = opt.optimizer.state_dict()
    assert now["param_groups"] == state["param_groups"]
    assert now["state"].keys() == state["state"].keys()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(now["state"][key][name], tensor)


@pytest.mark.parametrize("where", ["task", "mlm"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gradients_raise_and_change_nothing(where, value):
    net = mlp()
    opt = GEMProjector(torch.optim.Adam(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    wrapped_step(opt, net, 0, NAMES)
    before = snapshot(net, opt)
    opt.zero_grad()
    poison = net[0].weight.sum() * value
    (task_loss(net, 1) + (poison if where == "task" else 0)).backward()
    for k, name in enumerate(NAMES):
        with opt.constraint(name):
            (memory_loss(net, 1, k) + (poison if where == name else 0)).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert_unchanged(net, opt, before)
    for p, grad in zip(net.parameters(), grads, strict=True):
        assert torch.equal(p.grad.nan_to_num(), grad.nan_to_num())


def test_a_missing_constraint_gradient_raises():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    before = snapshot(net, opt)
    opt.zero_grad()
    task_loss(net, 0).backward()
    with opt.constraint("mlm"):
        memory_loss(net, 0, 0).backward()
    with pytest.raises(RuntimeError, match="'xsr'"):
        opt.step()
    assert_unchanged(net, opt, before)


def test_a_constraint_used_by_a_step_must_be_recomputed():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    wrapped_step(opt, net, 0, NAMES)
    task_loss(net, 1).backward()
    with pytest.raises(RuntimeError, match="since the last step"):
        opt.step()


def test_a_stale_constraint_row_is_cleared_before_it_is_refilled():
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        net.zero_grad()  # the model's zero_grad does not know about constraint rows
        backward_all(opt, net, step, NAMES)
        opt.step()
        reference_step(ref, ref_opt, step, len(NAMES))
        assert params_equal(net, ref)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"margin": -1.0}, "margin"),
        ({"mode": "pcgrad"}, "mode"),
        ({"eps": float("inf")}, "eps"),
        ({"constraints": -1}, "at least 0"),
        ({"constraints": ["a", "a"]}, "unique"),
        ({"constraints": ["a", ""]}, "names"),
        ({"solver": "gurobi"}, "not installed"),
        ({"constraints": 2, "solver": "closed_form"}, "exactly one"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GEMProjector(torch.optim.SGD(mlp().parameters(), lr=0.1), **kwargs)


def test_wrapping_something_that_is_not_an_optimizer_is_refused():
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        GEMProjector(mlp().parameters(), margin=0.0)


def test_unknown_constraint_names():
    opt = GEMProjector(torch.optim.SGD(mlp().parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    with pytest.raises(ValueError, match="unknown constraint 'nli'"):
        opt.constraint("nli")
    with pytest.raises(ValueError, match="name the constraint"):
        opt.constraint()
    with pytest.raises(ValueError, match="unknown constraint 5"):
        opt.constraint(5)


def test_routing_blocks_do_not_nest_and_surgery_is_not_run_inside_one():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    with opt.constraint("mlm"):
        with pytest.raises(RuntimeError, match="do not nest"), opt.constraint("xsr"):
            pass
        with pytest.raises(RuntimeError, match="inside"):
            opt.apply_surgery()


def test_gradients_after_apply_surgery_are_refused():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0)
    task_loss(net, 0).backward()
    with opt.constraint():
        memory_loss(net, 0, 0).backward()
    opt.apply_surgery()
    with pytest.raises(RuntimeError, match="already ran"), opt.constraint():
        pass


# -- mixed precision ------------------------------------------------------------------------


def scaled_step(opt, scaler, net, step, poison_row=None):
    opt.zero_grad()
    scaler.scale(task_loss(net, step) * (1e38 if poison_row == "task" else 1)).backward()
    for k, name in enumerate(NAMES):
        with opt.constraint(name):
            loss = memory_loss(net, step, k) * (1e38 if poison_row == name else 1)
            scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def test_grad_scaler_gives_the_unscaled_trajectory():
    net, ref = mlp(), mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = GEMProjector(
        torch.optim.SGD(net.parameters(), lr=0.1), 0.3, constraints=NAMES, grad_scaler=scaler
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(4):
        scaled_step(opt, scaler, net, step)
        reference_step(ref, ref_opt, step, len(NAMES), margin=0.3)
        assert params_equal(net, ref)


@pytest.mark.parametrize("row", ["task", "xsr"])
def test_grad_scaler_skips_an_overflowing_step_and_backs_off(row):
    net = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = GEMProjector(
        torch.optim.Adam(net.parameters(), lr=0.1),
        margin=0.0,
        constraints=NAMES,
        grad_scaler=scaler,
    )
    scaled_step(opt, scaler, net, 0)
    before = snapshot(net, opt)
    scaled_step(opt, scaler, net, 1, poison_row=row)
    assert_unchanged(net, opt, before)
    assert scaler.get_scale() == 2.0**9
    assert opt.last_stats.skipped  # the scaler hands itself over: the wrapper decides
    scaled_step(opt, scaler, net, 2)
    assert not opt.last_stats.skipped
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), before[0], strict=True))


def test_grad_scaler_with_explicit_unscale_and_clipping():
    net, ref = mlp(), mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = GEMProjector(
        torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES, grad_scaler=scaler
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.zero_grad()
    scaler.scale(task_loss(net, 0)).backward()
    for k, name in enumerate(NAMES):
        with opt.constraint(name):
            scaler.scale(memory_loss(net, 0, k)).backward()
    opt.apply_surgery()  # unscales the task gradient itself
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1e9)
    scaler.step(opt)
    scaler.update()
    reference_step(ref, ref_opt, 0, len(NAMES))
    assert params_equal(net, ref)


# -- the rest of the Optimizer interface ---------------------------------------------------


def test_step_hooks_run():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES)
    seen = []
    opt.register_step_pre_hook(lambda optimizer, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda optimizer, args, kwargs: seen.append("post"))
    wrapped_step(opt, net, 0, NAMES)
    assert seen == ["pre", "post"]


def test_repr_shows_the_settings_and_the_inner_optimizer():
    opt = GEMProjector(torch.optim.SGD(mlp().parameters(), lr=0.1), 0.5, constraints=NAMES)
    text = repr(opt)
    assert text.startswith("GEMProjector(")
    for part in ("margin=0.5", "constraints=['mlm', 'xsr']", "mode='gem'", "SGD"):
        assert part in text


def test_zero_grad_keeps_the_views():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0)
    grads = [p.grad for p in net.parameters()]
    task_loss(net, 0).backward()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is g for p, g in zip(net.parameters(), grads, strict=True))
    assert all(bool((p.grad == 0).all()) for p in net.parameters())


def test_a_step_with_validation_off_does_not_synchronise():
    net, ref = mlp(), mlp()
    opt = GEMProjector(
        torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES, validate=False
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        with no_host_sync():
            opt.zero_grad()
            backward_all(opt, net, step, NAMES)
            opt.apply_surgery()
        opt.step()
        reference_step(ref, ref_opt, step, len(NAMES))
        assert params_equal(net, ref)


def test_one_line_wrap_of_a_model_with_a_loss_it_does_not_reach():
    # a memory loss that reaches only part of the model: the rest of its row is zero
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.zero_grad()
    batch_loss(net, 5).backward()
    with opt.constraint():
        (-net[2].bias.sum()).backward()
    opt.step()
    g = torch.cat(
        [gr.flatten() for gr in torch.autograd.grad(batch_loss(ref, 5), list(ref.parameters()))]
    )
    row = torch.cat(
        [
            gr.flatten()
            for gr in torch.autograd.grad(
                -ref[2].bias.sum(),
                list(ref.parameters()),
                allow_unused=True,
                materialize_grads=True,
            )
        ]
    )
    x = gem_project(g, row[None])
    offset = 0
    for p in ref.parameters():
        p.grad = x[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    ref_opt.step()
    assert params_equal(net, ref)


def test_a_refused_construction_leaves_the_model_alone():
    net = mlp()
    task_loss(net, 0).backward()
    grads = [p.grad for p in net.parameters()]
    with pytest.raises(ValueError):
        GEMProjector(
            torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=2, solver="nope"
        )
    assert all(p.grad is g for p, g in zip(net.parameters(), grads, strict=True))


def test_two_surgeries_cannot_be_stacked():
    inner = GEMProjector(torch.optim.SGD(mlp().parameters(), lr=0.1), margin=0.0)
    with pytest.raises(ValueError, match="one gradient surgery"):
        GEMProjector(inner, margin=0.0)


def test_backward_constraint_leaves_parameters_outside_the_wrapper_alone():
    rows, head_grads = [], []
    for restricted in (True, False):
        net = mlp()
        head = torch.nn.Linear(3, 1)
        opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0)
        memory = head(net(torch.ones(2, 6))).square().sum()
        if restricted:
            opt.backward_constraint(memory)
        else:
            with opt.constraint():
                memory.backward()
        rows.append(opt.bank.blocks[0][1].clone())
        head_grads.append(head.weight.grad)
    assert head_grads[0] is None  # a head with its own optimizer gets nothing
    assert head_grads[1] is not None  # inside the block, the memory loss reaches it
    torch.testing.assert_close(rows[0], rows[1])

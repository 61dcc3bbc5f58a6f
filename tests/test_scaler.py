"""GradScaler: every wrapper learns its scaler from ``scaler.step`` and matches the unscaled
run bit for bit; overflow in any row skips the step and backs the scale off; a skipped or
refused step never leaks its rows into the next one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradsurgery import (
    MGDA,
    GEMProjector,
    GradVac,
    NonFiniteGradientError,
    ParetoLessForgetting,
    PCGrad,
    PhasedLR,
    SurgeryOptimizer,
    Uniform,
)
from tests.encoders import bert, tagging_loss

T = 3
SCALE = 2.0**12

BUILDERS: dict[str, Callable[..., SurgeryOptimizer[Any]]] = {
    "gem": lambda opt, **kw: GEMProjector(opt, 0.1, constraints=T - 1, **kw),
    "uniform": lambda opt, **kw: Uniform(opt, T, **kw),
    "pcgrad": lambda opt, **kw: PCGrad(opt, T, generator=torch.Generator().manual_seed(1), **kw),
    "gradvac": lambda opt, **kw: GradVac(
        opt, T, beta=0.5, generator=torch.Generator().manual_seed(1), **kw
    ),
    "gradvac_param": lambda opt, **kw: GradVac(
        opt,
        T,
        beta=0.5,
        granularity="parameter",
        generator=torch.Generator().manual_seed(1),
        **kw,
    ),
    "mgda": lambda opt, **kw: MGDA(opt, T, **kw),
    "lfmlf": lambda opt, **kw: ParetoLessForgetting(opt, T, **kw),
}
NAMES = list(BUILDERS)


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def losses(net: nn.Module, step: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(T, 5, 4, generator=gen)
    y = torch.randn(T, 5, 2, generator=gen) + torch.tensor([1.5, -1.5, 0.5]).view(T, 1, 1)
    return [((net(x[k]) - y[k]) ** 2).mean() for k in range(T)]


def build(name: str, seed: int = 0, **kwargs: Any) -> tuple[nn.Module, SurgeryOptimizer[Any]]:
    net = model(seed)
    return net, BUILDERS[name](torch.optim.Adam(net.parameters(), lr=0.05), **kwargs)


def fill(
    name: str,
    net: nn.Module,
    opt: SurgeryOptimizer[Any],
    step: int,
    scale: Callable[[Tensor], Tensor] = lambda loss: loss,
    poison: int | None = None,
) -> None:
    parts = [scale(loss) for loss in losses(net, step)]
    if poison is not None:
        parts[poison] = parts[poison] * torch.inf
    if name == "gem":
        parts[0].backward(retain_graph=True)
        for k in range(1, T):
            with opt.constraint(k - 1):  # type: ignore[attr-defined]
                parts[k].backward(retain_graph=k < T - 1)
    else:
        opt.backward(parts)  # type: ignore[attr-defined]


def params(net: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def identical(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def failing_step(*args: Any, **kwargs: Any) -> None:
    raise OSError("disk")


def plain_run(name: str, steps: range, seed: int = 0) -> list[Tensor]:
    net, opt = build(name, seed)
    for step in steps:
        opt.zero_grad()
        fill(name, net, opt, step)
        opt.step()
    return params(net)


@pytest.mark.parametrize("give", [True, False], ids=["grad_scaler=", "from_step"])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["", "unscale_"])
@pytest.mark.parametrize("name", NAMES)
def test_a_power_of_two_scale_gives_the_unscaled_run_bit_for_bit(name, give, unscale_first):
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1)
    net, opt = build(name, grad_scaler=scaler if give else None)
    for step in range(4):
        opt.zero_grad()
        fill(name, net, opt, step, scaler.scale)
        if unscale_first:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1e9)
        scaler.step(opt)
        scaler.update()
        assert not opt.last_stats.skipped
    assert scaler.get_scale() == SCALE * 2**4  # grew every step: no overflow was recorded
    assert identical(params(net), plain_run(name, range(4)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("row", [0, 1, 2])
def test_an_overflow_in_any_row_skips_and_backs_off(name, row):
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    net, opt = build(name)  # the scaler is only known through scaler.step
    opt.zero_grad()
    fill(name, net, opt, 0, scaler.scale, poison=row)
    before = params(net)
    scaler.step(opt)
    scaler.update()
    assert opt.last_stats.skipped
    assert identical(params(net), before)
    assert opt.state == {} or all(s.get("step", 0) == 0 for s in opt.state.values())
    assert scaler.get_scale() == SCALE / 2


@pytest.mark.parametrize("zero", ["model", "inner", "wrapper", "inner_in_place"])
@pytest.mark.parametrize("name", ["gem", "pcgrad", "lfmlf"])
def test_a_skipped_step_leaves_nothing_in_the_rows(name, zero):
    """Issue 12 item 4b: skipped step, model.zero_grad(), the next backward adds to nothing."""
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    net, opt = build(name)
    fill(name, net, opt, 0, scaler.scale, poison=1)
    scaler.step(opt)
    scaler.update()
    assert opt.last_stats.skipped
    for step in range(1, 3):
        if zero == "model":
            net.zero_grad()
        elif zero == "inner":
            opt.optimizer.zero_grad()
        elif zero == "inner_in_place":
            opt.optimizer.zero_grad(set_to_none=False)
        else:
            opt.zero_grad()
        fill(name, net, opt, step, scaler.scale)
        scaler.step(opt)
        scaler.update()
    net_ref, opt_ref = build(name)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE / 2)
    for step in range(1, 3):
        opt_ref.zero_grad()
        fill(name, net_ref, opt_ref, step, scaler.scale)
        scaler.step(opt_ref)
        scaler.update()
    if name == "lfmlf":  # its ḡ did not move in the skipped step either
        assert torch.equal(opt.accumulated(), opt_ref.accumulated())
    assert identical(params(net), params(net_ref))


@pytest.mark.parametrize("name", ["gem", "pcgrad", "mgda"])
def test_after_a_non_finite_gradient_error_the_next_step_starts_clean(name):
    """Issue 12 item 4c: the NaN row is cleared by the next backward into it."""
    net, opt = build(name)
    fill(name, net, opt, 0, poison=2)
    before = params(net)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert identical(params(net), before)
    for step in range(1, 3):
        net.zero_grad()
        fill(name, net, opt, step)
        opt.step()
    assert identical(params(net), plain_run(name, range(1, 3)))


@pytest.mark.parametrize("name", ["gem", "pcgrad"])
def test_a_failed_inner_step_then_zeroing_through_the_model_starts_a_new_step(name):
    net, opt = build(name)
    fill(name, net, opt, 0)
    opt.optimizer.step = failing_step
    with pytest.raises(OSError, match="disk"):
        opt.step()
    del opt.optimizer.step
    for step in range(1, 3):
        net.zero_grad()
        fill(name, net, opt, step)
        opt.step()
    assert identical(params(net), plain_run(name, range(1, 3)))


def test_a_retry_after_zeroing_through_the_model_is_refused_not_stepped_unprojected():
    net, opt = build("gem")
    fill("gem", net, opt, 0)
    opt.optimizer.step = failing_step
    with pytest.raises(OSError, match="disk"):
        opt.step()
    del opt.optimizer.step
    net.zero_grad()
    losses(net, 1)[0].backward()  # a new task gradient, but no constraint gradient
    before = params(net)
    with pytest.raises(RuntimeError, match="no gradient for constraint '0', '1'"):
        opt.step()
    assert identical(params(net), before)


def test_a_refused_step_does_not_accumulate_into_the_next():
    net, opt = build("gem")
    fill("gem", net, opt, 0)
    with opt.constraint(0):
        pass
    opt._filled[1] = False  # as if constraint 1 had not been computed
    with pytest.raises(RuntimeError, match="no gradient for constraint '1'"):
        opt.step()
    net.zero_grad()
    fill("gem", net, opt, 1)
    opt.step()
    assert identical(params(net), plain_run("gem", range(1, 2)))


# -- which scaler ---------------------------------------------------------------------------


def test_another_scaler_than_the_given_one_is_refused():
    mine = torch.amp.GradScaler("cpu", init_scale=SCALE)
    other = torch.amp.GradScaler("cpu", init_scale=SCALE)
    net, opt = build("pcgrad", grad_scaler=mine)
    fill("pcgrad", net, opt, 0, other.scale)
    before = params(net)
    with pytest.raises(RuntimeError, match="another one steps it"):
        other.step(opt)
    assert identical(params(net), before)


def hide_the_scaler(opt: SurgeryOptimizer[Any]) -> None:
    """Wrap ``step`` as accelerate does: ``GradScaler`` then sets ``found_inf`` instead."""
    step = opt.step

    def patched(*args: Any, **kwargs: Any) -> Any:
        return step(*args, **kwargs)

    opt.step = patched  # type: ignore[method-assign]


def test_a_scaler_that_does_not_hand_itself_over_must_be_given():
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    net, opt = build("uniform")
    hide_the_scaler(opt)
    fill("uniform", net, opt, 0, scaler.scale)
    before = params(net)
    with pytest.raises(RuntimeError, match="without handing itself over"):
        scaler.step(opt)
    assert identical(params(net), before)


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("name", ["gem", "uniform"])
def test_a_hidden_hand_over_works_with_the_given_scaler(name, unscale_first):
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    net, opt = build(name, grad_scaler=scaler)
    hide_the_scaler(opt)
    for step in range(3):
        opt.zero_grad()
        fill(name, net, opt, step, scaler.scale)
        if unscale_first:
            opt.apply_surgery()
        scaler.step(opt)
        scaler.update()
    assert identical(params(net), plain_run(name, range(3)))
    other = torch.amp.GradScaler("cpu", init_scale=SCALE)
    opt.zero_grad()
    fill(name, net, opt, 3, other.scale)
    with pytest.raises(RuntimeError, match="another one steps it"):
        other.step(opt)


def test_apply_surgery_without_the_scaler_before_scaler_step_is_refused():
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    net, opt = build("uniform")
    fill("uniform", net, opt, 0, scaler.scale)
    opt.apply_surgery()  # cannot know the rows are scaled
    before = params(net)
    with pytest.raises(RuntimeError, match=r"apply_surgery\(\) ran without the GradScaler"):
        scaler.step(opt)
    assert identical(params(net), before)
    opt.zero_grad()
    fill("uniform", net, opt, 1, scaler.scale)  # the step ended: the rows start from zero
    scaler.step(opt)
    scaler.update()
    assert identical(params(net), plain_run("uniform", range(1, 2)))


def test_a_scaler_not_updated_after_a_failed_step_is_named():
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    net, opt = build("gem", solver="daqp")
    fill("gem", net, opt, 0, scaler.scale)
    opt.optimizer.step = failing_step
    with pytest.raises(OSError):
        scaler.step(opt)
    del opt.optimizer.step
    net.zero_grad()
    fill("gem", net, opt, 1, scaler.scale)
    with pytest.raises(RuntimeError, match=r"call scaler.update\(\) after every"):
        scaler.step(opt)


def test_a_disabled_scaler_steps_as_without_one():
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    net, opt = build("pcgrad", grad_scaler=scaler)
    for step in range(3):
        opt.zero_grad()
        fill("pcgrad", net, opt, step, scaler.scale)
        scaler.step(opt)
        scaler.update()
    assert identical(params(net), plain_run("pcgrad", range(3)))


def test_fp16_parameters_under_a_scaler_are_refused_before_anything_changes():
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    net = model().half()
    opt = Uniform(torch.optim.SGD(net.parameters(), lr=0.1), T)
    x = torch.randn(5, 4, dtype=torch.half)
    opt.backward([scaler.scale(net(x).float().pow(2).mean() * (k + 1)) for k in range(T)])
    before = params(net)
    with pytest.raises(ValueError, match="fp16 parameters"):
        scaler.step(opt)
    assert identical(params(net), before)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_scaler_step_through_phased_lr_reaches_the_surgery(unscale_first):
    runs = []
    for scaler in (torch.amp.GradScaler("cpu", init_scale=SCALE), None):
        net = bert(2)
        gem = GEMProjector(torch.optim.AdamW(net.parameters(), lr=0.01))
        opt = PhasedLR(gem, net, window=2)
        for step in range(3):
            opt.zero_grad()
            scale = scaler.scale if scaler is not None else (lambda loss: loss)
            scale(tagging_loss(net, step)).backward()
            with gem.constraint():
                scale(tagging_loss(net, step, shift=1)).backward()
            opt.observe(1.0 / (step + 1))
            if scaler is None:
                opt.step()
                continue
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            assert not gem.last_stats.skipped
        runs.append(params(net))
    assert identical(*runs)


def test_stepping_through_a_scaler_warns_the_user_of_nothing():
    # pytest resets warning filters per test, so the user's view is checked in a fresh process.
    script = """
import torch
from gradsurgery import GEMProjector
net = torch.nn.Linear(3, 1)
opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1))
scaler = torch.amp.GradScaler("cpu")
for _ in range(2):
    opt.zero_grad()
    scaler.scale(net(torch.ones(2, 3)).sum()).backward()
    with opt.constraint():
        scaler.scale(-net(torch.ones(2, 3)).sum()).backward()
    scaler.step(opt)
    scaler.update()
print("stepped", opt.last_stats.skipped)
"""
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "stepped False"
    assert "Warning" not in done.stderr, done.stderr

"""Faults in one process: resuming from a checkpoint, an inner step that raises, a routed
backward that raises. Each must leave the trajectory bit-identical to an undisturbed run."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradsurgery import (
    MGDA,
    GEMProjector,
    GradVac,
    ParetoLessForgetting,
    PCGrad,
    SurgeryOptimizer,
)

T = 3
STEPS = 5


class FlakySGD(torch.optim.SGD):
    """SGD whose next ``step`` raises when ``fail`` is set (then clears it)."""

    fail = False

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.fail:
            self.fail = False
            raise RuntimeError("inner step failed")
        return super().step(closure)


def build(name: str, opt: torch.optim.Optimizer, seed: int) -> SurgeryOptimizer[Any]:
    gen = torch.Generator().manual_seed(seed)
    if name == "gem":
        return GEMProjector(opt, 0.2, constraints=T - 1)
    if name == "pcgrad":
        return PCGrad(opt, T, generator=gen)
    if name == "gradvac":
        return GradVac(opt, T, beta=0.5, generator=gen)
    if name == "gradvac_param":
        return GradVac(opt, T, beta=0.5, granularity="parameter", generator=gen)
    if name == "mgda":
        return MGDA(opt, T)
    assert name == "lfmlf"
    return ParetoLessForgetting(opt, T)


NAMES = ["gem", "pcgrad", "gradvac", "gradvac_param", "mgda", "lfmlf"]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))


def losses(model: nn.Module, step: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(200 + step)
    x = torch.randn(T, 6, 4, generator=gen)
    y = torch.randn(T, 6, 1, generator=gen) + torch.tensor([2.0, -2.0, 0.5]).view(T, 1, 1)
    return [((model(x[k]) - y[k]) ** 2).mean() for k in range(T)]


def fill(name: str, model: nn.Module, opt: SurgeryOptimizer[Any], step: int) -> None:
    opt.zero_grad()
    parts = losses(model, step)
    if name == "gem":
        parts[0].backward(retain_graph=True)
        for k in range(1, T):
            with opt.constraint(k - 1):  # type: ignore[attr-defined]
                parts[k].backward(retain_graph=k < T - 1)
    else:
        opt.backward(parts)  # type: ignore[attr-defined]


def setup(name: str, seed: int, *, flaky: bool = False) -> tuple[nn.Module, Any, Any]:
    model = make_model(seed)
    inner = (
        FlakySGD(model.parameters(), lr=0.05, momentum=0.9)
        if flaky
        else torch.optim.AdamW(model.parameters(), lr=0.05)
    )
    opt = build(name, inner, seed)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def run(name: str, model: nn.Module, opt: Any, sched: Any, steps: range) -> None:
    for step in steps:
        fill(name, model, opt, step)
        opt.step()
        sched.step()


def params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_identical(a: list[Tensor], b: list[Tensor]) -> None:
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_checkpoint_is_bit_identical(name):
    model, opt, sched = setup(name, seed=0)
    run(name, model, opt, sched, range(STEPS))
    expected = params(model)

    model, opt, sched = setup(name, seed=0)
    run(name, model, opt, sched, range(2))
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    # a fresh process: other initial weights, another generator seed, a fresh scheduler
    model, opt, sched = setup(name, seed=1)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    run(name, model, opt, sched, range(2, STEPS))
    assert_identical(params(model), expected)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)


@pytest.mark.parametrize("name", ["gem", "pcgrad", "lfmlf"])
def test_a_failed_inner_step_is_retried_without_redoing_the_surgery(name):
    model, opt, sched = setup(name, seed=0, flaky=True)
    run(name, model, opt, sched, range(STEPS))
    expected = params(model)

    model, opt, sched = setup(name, seed=0, flaky=True)
    run(name, model, opt, sched, range(2))
    fill(name, model, opt, 2)
    before = params(model)
    opt.optimizer.fail = True
    with pytest.raises(RuntimeError, match="inner step failed"):
        opt.step()
    assert_identical(params(model), before)
    with pytest.raises(RuntimeError, match="already ran"), opt._route(0):  # would be lost
        pass
    opt.step()  # the retry steps on the surgery's result; no second draw, no second ḡ update
    sched.step()
    run(name, model, opt, sched, range(3, STEPS))
    assert_identical(params(model), expected)


def test_an_exception_inside_a_routing_block_leaves_the_bank_bound_to_grad():
    model, opt, sched = setup("pcgrad", seed=0)
    run("pcgrad", model, opt, sched, range(STEPS))
    expected = params(model)

    model, opt, sched = setup("pcgrad", seed=0)
    run("pcgrad", model, opt, sched, range(2))
    with pytest.raises(ValueError, match="bad batch"), opt.objective(1):
        losses(model, 99)[1].backward()
        raise ValueError("bad batch")
    assert opt.bank.bound_row == 0
    views = opt.bank.row_views(0)
    assert all(p.grad is v for p, v in zip(opt.bank.params, views, strict=True))
    run("pcgrad", model, opt, sched, range(2, STEPS))  # zero_grad clears the partial row
    assert_identical(params(model), expected)

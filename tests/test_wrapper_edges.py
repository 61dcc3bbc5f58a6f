"""Edges of the wrappers: a rewritten gradient that overflows its dtype, inner optimizers
that need a closure, copies and pickles of a wrapper, and a single row name."""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
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
from gradsurgery.functional import gem_project
from gradsurgery.wrappers import overflow
from tests import reference
from tests.encoders import bert, tagging_loss
from tests.test_scaler import BUILDERS, build, fill, identical, params

FP16_MAX = torch.finfo(torch.float16).max


class Vector(nn.Module):
    """One parameter ``w``; the loss ``⟨w, g⟩`` has gradient ``g`` exactly."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=dtype))

    def loss(self, g: list[float]) -> Tensor:
        return (self.w * torch.tensor(g, dtype=self.w.dtype)).sum()


# -- a rewritten gradient that overflows ------------------------------------------------------


def gem_fp16_step(a: float) -> GEMProjector:
    vec = Vector(torch.float16)
    opt = GEMProjector(torch.optim.SGD(vec.parameters(), lr=1e-6), margin=0.0)
    vec.loss([a, a]).backward()
    with opt.constraint():
        vec.loss([1.0, -3.0]).backward()
    return opt


def test_the_reported_fp16_projection_is_refused_before_anything_changes():
    vec = Vector(torch.float16)
    opt = GEMProjector(torch.optim.SGD(vec.parameters(), lr=1.0), margin=0.0)
    vec.loss([6e4, 6e4]).backward()
    with opt.constraint():
        vec.loss([1.0, -3.0]).backward()
    with pytest.raises(NonFiniteGradientError, match="overflows the parameters' dtype"):
        opt.step()
    assert torch.equal(vec.w, torch.zeros(2, dtype=torch.float16))
    assert vec.w.grad is not None
    assert torch.equal(vec.w.grad, torch.tensor([6e4, 6e4], dtype=torch.float16))


@pytest.mark.parametrize("a", [3e4, 5.4e4, 5.45e4, 5.46e4, 5.47e4, 5.5e4, 6.5e4])
def test_gem_refuses_exactly_the_fp16_projections_that_overflow(a):
    # x = g − (⟨g, g₁⟩/‖g₁‖²) g₁ = (1.2a, 0.4a), computed here in float64 from the fp16 inputs
    g = torch.tensor([a, a], dtype=torch.float16).double()
    g1 = torch.tensor([1.0, -3.0], dtype=torch.float64)
    x = g - (g @ g1) / (g1 @ g1) * g1
    overflows = bool(torch.isinf(x.half()).any())
    opt = gem_fp16_step(a)
    if overflows:
        with pytest.raises(NonFiniteGradientError, match="overflows"):
            opt.step()
    else:
        opt.step()
        assert torch.isfinite(opt.bank.blocks[0][0]).all()
        torch.testing.assert_close(opt.bank.blocks[0][0].double(), x, rtol=1e-3, atol=0)


def test_gem_project_refuses_the_reported_fp16_projection():
    g = torch.tensor([6e4, 6e4], dtype=torch.float16)
    g1 = torch.tensor([[1.0, -3.0]], dtype=torch.float16)
    with pytest.raises(NonFiniteGradientError, match=r"projection overflows torch\.float16"):
        gem_project(g, g1)
    x = gem_project(g.float(), g1.float())
    assert torch.isfinite(x).all() and x[0] > torch.finfo(torch.float16).max


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_a_sum_of_objectives_that_overflows_fp16_is_refused(name):
    vec = Vector(torch.float16)
    sgd = torch.optim.SGD(vec.parameters(), lr=1e-6)
    opt: SurgeryOptimizer[Any] = PCGrad(sgd, 2) if name == "pcgrad" else GradVac(sgd, 2)
    opt.backward([vec.loss([4e4, 1.0]), vec.loss([4e4, 2.0])])
    drawn = opt.generator.get_state()
    with pytest.raises(NonFiniteGradientError, match="overflows"):
        opt.step()
    assert torch.equal(vec.w, torch.zeros(2, dtype=torch.float16))
    assert torch.equal(opt.bank.blocks[0][0], torch.zeros(2, dtype=torch.float16))
    assert torch.equal(opt.generator.get_state(), drawn)


@pytest.mark.parametrize("wrapper", [Uniform, MGDA, ParetoLessForgetting])
def test_a_convex_combination_of_large_fp16_gradients_steps(wrapper):
    vec = Vector(torch.float16)
    opt = wrapper(torch.optim.SGD(vec.parameters(), lr=1e-6), 2)
    opt.backward([vec.loss([6e4, 1.0]), vec.loss([6.5e4, 2.0])])
    opt.step()
    assert torch.isfinite(vec.w).all() and (vec.w != 0).any()


def huge_margin_step(
    grad_scaler: torch.amp.GradScaler | None, dtype: torch.dtype
) -> tuple[Vector, GEMProjector]:
    # v ≥ margin = 1e30 times ‖g₁‖ ≈ 1.4e10 overflows fp32 and bf16 although the Gram is finite
    vec = Vector(dtype)
    opt = GEMProjector(torch.optim.SGD(vec.parameters(), lr=1.0), 1e30, grad_scaler=grad_scaler)
    scale = grad_scaler.scale if grad_scaler is not None else (lambda loss: loss)
    scale(vec.loss([1.0, 2.0])).backward()
    with opt.constraint():
        scale(vec.loss([1e10, -1e10])).backward()
    return vec, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_fp32_or_bf16_projection_that_overflows_is_refused(dtype):
    vec, opt = huge_margin_step(None, dtype)
    with pytest.raises(NonFiniteGradientError, match="overflows"):
        opt.step()
    assert torch.equal(vec.w, torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_overflowing_projection_under_a_scaler_is_skipped_and_backs_off(dtype):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    vec, opt = huge_margin_step(scaler, dtype)
    scaler.step(opt)
    scaler.update()
    assert opt.last_stats is not None and opt.last_stats.skipped
    assert torch.equal(vec.w, torch.zeros(2, dtype=dtype))
    assert scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_step_whose_bound_fits_makes_no_extra_pass(name, monkeypatch):
    def no_pass(*args: Any, **kwargs: Any) -> Tensor:
        raise AssertionError("an extra pass over the gradients")

    monkeypatch.setattr(overflow, "combine_overflows", no_pass)
    monkeypatch.setattr(overflow, "row0_finite", no_pass)
    net, opt = build(name)
    for step in range(3):
        opt.zero_grad()
        fill(name, net, opt, step)
        opt.step()


# -- inner optimizers that need a closure -----------------------------------------------------


class NeedsClosure(torch.optim.SGD):
    def step(self, closure: Any) -> Any:  # type: ignore[override]
        return super().step(closure)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("inner", [torch.optim.LBFGS, NeedsClosure])
def test_an_inner_optimizer_whose_step_needs_a_closure_is_refused(name, inner):
    net = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="requires a closure"):
        BUILDERS[name](inner(net.parameters(), lr=0.1))


# -- copies ------------------------------------------------------------------------------------


def copy_with(how: str, pair: Any) -> Any:
    if how == "deepcopy":
        return copy.deepcopy(pair)
    if how == "pickle":
        return pickle.loads(pickle.dumps(pair))
    buffer = io.BytesIO()
    torch.save(pair, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_copy_of_model_and_wrapper_is_an_independent_working_pair(name, how):
    net, opt = build(name)
    for step in range(2):
        opt.zero_grad()
        fill(name, net, opt, step)
        opt.step()
    net_copy, opt_copy = copy_with(how, (net, opt))
    assert type(opt_copy) is type(opt) and opt_copy.row_names == opt.row_names
    assert repr(opt_copy) == repr(opt)
    blocks = {block.untyped_storage().data_ptr() for block in opt_copy.bank.blocks}
    for p in net_copy.parameters():
        assert p.grad is not None and p.grad.untyped_storage().data_ptr() in blocks
    assert opt_copy.state[next(iter(net_copy.parameters()))]["step"] == 2
    at_copy = params(net)
    for step in range(2, 4):  # the copy goes on; the original must not move
        opt_copy.zero_grad()
        fill(name, net_copy, opt_copy, step)
        opt_copy.step()
    assert identical(params(net), at_copy)
    for step in range(2, 4):
        opt.zero_grad()
        fill(name, net, opt, step)
        opt.step()
    assert identical(params(net_copy), params(net))


def test_a_copy_carries_rows_filled_mid_step():
    net, opt = build("gem")
    fill("gem", net, opt, 0)
    net_copy, opt_copy = copy.deepcopy((net, opt))
    opt.step()
    opt_copy.step()
    assert identical(params(net_copy), params(net))


def test_a_stack_around_a_surgery_is_copied_whole():
    net = bert(2)
    gem = GEMProjector(torch.optim.AdamW(net.parameters(), lr=0.01), margin=0.0)
    opt = PhasedLR(gem, net, window=2)
    pairs = [(net, opt, gem)]
    pairs.append(copy.deepcopy(pairs[0]))
    for step in range(2):
        for model, phased, surgery in pairs:
            phased.zero_grad()
            tagging_loss(model, step).backward()
            with surgery.constraint():
                tagging_loss(model, step, shift=1).backward()
            phased.observe(1.0 / (step + 1))
            phased.step()
    assert pairs[1][1].optimizer is pairs[1][2] and pairs[1][2].wrapped_by is pairs[1][1]
    assert identical(params(pairs[0][0]), params(pairs[1][0]))


# -- one name ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrapper",
    [
        lambda opt, names: GEMProjector(opt, margin=0.0, constraints=names),
        lambda opt, names: Uniform(opt, names),
        lambda opt, names: PCGrad(opt, names),
        lambda opt, names: GradVac(opt, names),
        lambda opt, names: MGDA(opt, names),
        lambda opt, names: MGDA(opt, names, solver="daqp"),
        lambda opt, names: ParetoLessForgetting(opt, names),
    ],
)
def test_a_single_string_is_one_name(wrapper):
    net = nn.Linear(3, 1)
    opt = wrapper(torch.optim.SGD(net.parameters(), lr=0.1), "memory")
    assert opt.row_names == ("memory",)
    with pytest.raises(ValueError, match="a count or names"):
        wrapper(torch.optim.SGD(net.parameters(), lr=0.1), True)


def test_a_single_constraint_name_routes_and_projects():
    net, ref = nn.Linear(3, 1), nn.Linear(3, 1)
    ref.load_state_dict(net.state_dict())
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints="memory")
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    net(x).sum().backward()
    with opt.constraint("memory"):
        (-net(x).sum()).backward()
    opt.step()
    assert opt.last_stats is not None and bool(opt.last_stats.projected)
    torch.testing.assert_close(net.weight, ref.weight)  # g and −g: the projection is 0


# -- the overflow check against a float64 reference ------------------------------------------


@st.composite
def fp16_rows(draw: st.DrawFn, rows: int) -> np.ndarray:
    """``rows`` fp16-representable vectors of 2..5 entries, often near fp16's largest value:
    random scales, all large, aligned with the first (sums overflow) or conflicting with it
    through small integer rows (projections overflow, as in g = [6e4, 6e4], g₁ = [1, −3])."""
    p = draw(st.integers(2, 5))
    structure = draw(st.sampled_from(["random", "large", "aligned", "conflict"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    signs = rng.choice([-1.0, 1.0], size=(rows, p))
    if structure == "random":
        values = signs * 10.0 ** rng.uniform(-1, np.log10(6.5e4), size=(rows, p))
    else:
        values = signs * rng.uniform(2e4, 6.5e4, size=(rows, p))
    if structure == "aligned":
        values[1:] = values[0] * rng.uniform(0.3, 1.0, size=(rows - 1, 1))
    if structure == "conflict":
        values[0] = rng.uniform(3e4, 6.5e4, size=p)
        values[1:] = -rng.integers(0, 5, size=(rows - 1, p))
        values[1:, rng.integers(p)] = rng.integers(1, 5, size=rows - 1)
    return values.astype(np.float16).astype(np.float64)


def classify(x: np.ndarray) -> str:
    """``"overflows"``/``"fits"`` when clear of the rounding band around fp16's largest value."""
    largest = float(np.abs(x).max())
    if largest > 65520 * 1.01:
        return "overflows"
    if largest < FP16_MAX * 0.99:
        return "fits"
    return "either"


@given(rows=fp16_rows(2))
def test_gem_in_fp16_raises_exactly_when_the_exact_projection_overflows(rows):
    g, g1 = rows
    x = reference.project(g, g1[None])
    vec = Vector(torch.float16)
    vec.w.data = torch.zeros(len(g), dtype=torch.float16)
    opt = GEMProjector(torch.optim.SGD(vec.parameters(), lr=0.0), margin=0.0, solver="closed_form")
    vec.loss(list(g)).backward()
    with opt.constraint():
        vec.loss(list(g1)).backward()
    expected = classify(x)
    try:
        opt.step()
    except NonFiniteGradientError:
        assert expected != "fits"
        assert torch.equal(vec.w.grad.double(), torch.tensor(g))  # nothing changed
        return
    assert expected != "overflows"
    grad = vec.w.grad.double().numpy()
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, x, rtol=0, atol=2e-3 * np.abs(g).max() + 1e-3)


@given(rows=fp16_rows(2))
def test_pcgrad_in_fp16_raises_exactly_when_the_exact_sum_overflows(rows):
    d = reference.pcgrad(rows, np.array([[1], [0]])).sum(axis=0)
    vec = Vector(torch.float16)
    vec.w.data = torch.zeros(rows.shape[1], dtype=torch.float16)
    opt = PCGrad(torch.optim.SGD(vec.parameters(), lr=0.0), 2)
    opt.backward([vec.loss(list(row)) for row in rows])
    expected = classify(d)
    try:
        opt.step()
    except NonFiniteGradientError:
        assert expected != "fits"
        assert not vec.w.grad.any()  # row 0 is left as it was: zero
        return
    assert expected != "overflows"
    grad = vec.w.grad.double().numpy()
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, d, rtol=0, atol=2e-3 * np.abs(rows).max() + 1e-3)

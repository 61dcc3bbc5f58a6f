"""Uniform without a Gram matrix: the same direction, the same refusals, the same rows read.

By default ``Uniform`` writes the mean of the objectives' rows into ``.grad`` and checks
what it wrote; ``stats=True`` computes the Gram matrix as the other wrappers do. Both must
give the same ``.grad``, and a non-finite row must be refused before anything changes.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gradsurgery import NonFiniteGradientError, Uniform
from gradsurgery import gram as gram_module
from gradsurgery.flat import GradientBank

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUT = st.lists(st.tuples(st.integers(1, 40), st.sampled_from(DTYPES)), min_size=1, max_size=3)


def build(
    layout: list[tuple[int, torch.dtype]], t: int, **kwargs: Any
) -> tuple[list[Tensor], Uniform]:
    params: list[Tensor] = [nn.Parameter(torch.zeros(n, dtype=dtype)) for n, dtype in layout]
    return params, Uniform(torch.optim.SGD(params, lr=0.5, momentum=0.9), t, **kwargs)


def rows_of(
    layout: list[tuple[int, torch.dtype]], t: int, seed: int, exponent: int
) -> list[list[Tensor]]:
    """``rows[k][i]``: objective ``k``'s gradient of parameter ``i`` (fp16 kept in range)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(t):
        row = []
        for n, dtype in layout:
            scale = 10.0 ** (max(-3, min(2, exponent)) if dtype == torch.float16 else exponent)
            values = rng.standard_normal(n) * scale * 10.0 ** rng.uniform(-1, 1)
            row.append(torch.tensor(values).to(dtype))
        out.append(row)
    return out


def fill(
    opt: Uniform, params: list[Tensor], rows: list[list[Tensor]], scale: Any = lambda x: x
) -> None:
    opt.zero_grad()
    for k, grads in enumerate(rows):
        with opt.objective(k):
            torch.autograd.backward(
                [scale((p * g).sum()) for p, g in zip(params, grads, strict=True)]
            )


def grads(params: list[Tensor]) -> list[Tensor]:
    return [p.grad.clone() for p in params]  # type: ignore[union-attr]


def snapshot(params: list[Tensor], opt: Uniform) -> tuple[list[Tensor], str]:
    return [p.detach().clone() for p in params], str(opt.state_dict())


def unchanged(params: list[Tensor], opt: Uniform, before: tuple[list[Tensor], str]) -> bool:
    same = all(torch.equal(p, q) for p, q in zip(params, before[0], strict=True))
    return same and str(opt.state_dict()) == before[1]


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 5),
    layout=LAYOUT,
    seed=st.integers(0, 2**32 - 1),
    exponent=st.integers(-30, 30),
    chunk=st.sampled_from([3, 8, 1 << 18]),
)
def test_the_mean_equals_the_gram_paths_and_the_float64_mean(t, layout, seed, exponent, chunk):
    rows = rows_of(layout, t, seed, exponent)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gram_module, "CPU_CHUNK", chunk)
        directions = []
        for stats in (False, True):
            params, opt = build(layout, t, stats=stats)
            fill(opt, params, rows)
            opt.apply_surgery()
            directions.append(grads(params))
    for i, (_, dtype) in enumerate(layout):
        assert torch.equal(directions[0][i], directions[1][i])
        stacked = torch.stack([row[i].double() for row in rows])
        reference = stacked.mean(dim=0)
        info = torch.finfo(dtype)
        bound = (t + 1) * info.eps * stacked.abs().mean(dim=0) + info.tiny
        assert bool(((directions[0][i].double() - reference).abs() <= bound).all())


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 4),
    layout=LAYOUT,
    seed=st.integers(0, 2**32 - 1),
    spoiled=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 39)),
        min_size=1,
        max_size=4,
    ),
    values=st.lists(
        st.sampled_from([float("nan"), float("inf"), -float("inf")]), min_size=4, max_size=4
    ),
    opposite=st.booleans(),
)
def test_any_non_finite_entry_is_refused_before_anything_changes(
    t, layout, seed, spoiled, values, opposite
):
    rows = rows_of(layout, t, seed, 0)
    for (k, i, j), value in zip(spoiled, values, strict=False):
        k, i = k % t, i % len(layout)
        j %= layout[i][0]
        rows[k][i][j] = value
        if opposite and t > 1:
            rows[(k + 1) % t][i][j] = -float("inf") if value > 0 else float("inf")
    params, opt = build(layout, t)
    fill(opt, params, [[g.clone() for g in row] for row in rows_of(layout, t, seed + 1, 0)])
    opt.step()  # momentum: the optimizer has state to keep
    before = snapshot(params, opt)
    fill(opt, params, rows)
    with pytest.raises(NonFiniteGradientError, match="a gradient holds NaN or Inf"):
        opt.step()
    assert unchanged(params, opt, before)
    assert all(bool((p.grad == 0).all()) for p in params)


def test_statistics_are_the_gram_paths_with_stats_and_the_free_ones_without():
    layout = [(5, torch.float32), (3, torch.float64)]
    rows = rows_of(layout, 3, seed=1, exponent=0)
    J = torch.stack([torch.cat([g.double() for g in row]) for row in rows])
    params, opt = build(layout, 3, stats=True)
    fill(opt, params, rows)
    stats = opt.apply_surgery()
    assert stats.gram is not None
    torch.testing.assert_close(stats.gram, J @ J.T, rtol=1e-6, atol=0)
    d = J.mean(dim=0)
    torch.testing.assert_close(stats.dots, J @ d, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(stats.direction_norm, d.norm(), rtol=1e-6, atol=0)
    logged = stats.to_dict()
    assert {"uniform/direction_norm", "uniform/dot/0", "uniform/grad_norm/2"} <= set(logged)

    params, opt = build(layout, 3)
    fill(opt, params, rows)
    stats = opt.apply_surgery()
    assert stats.gram is None and not stats.skipped
    torch.testing.assert_close(stats.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert stats.to_dict() == {
        "uniform/skipped": 0.0,
        **{f"uniform/weight/{k}": 1 / 3 for k in "012"},
    }
    for name in ("dots", "direction_norm", "grad_norms"):
        with pytest.raises(RuntimeError, match="stats=True"):
            getattr(stats, name)


def test_the_default_computes_no_gram_matrix(monkeypatch):
    calls = []
    original = GradientBank.gram

    def counted(self, **kwargs):
        calls.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(GradientBank, "gram", counted)
    layout = [(6, torch.float32)]
    rows = rows_of(layout, 2, seed=2, exponent=0)
    for stats, expected in ((False, 0), (True, 1)):
        calls.clear()
        params, opt = build(layout, 2, stats=stats)
        fill(opt, params, rows)
        opt.step()
        assert len(calls) == expected


def test_sums_of_finite_values_that_overflow_do_not_refuse_the_step():
    huge = torch.full((4,), 3e38)
    params, opt = build([(4, torch.float32)], 2)
    fill(opt, params, [[huge], [huge]])
    opt.apply_surgery()
    assert torch.equal(params[0].grad, huge)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_mean_of_the_largest_low_precision_values_stays_finite(dtype):
    largest = torch.finfo(dtype).max
    for t in range(1, 8):
        params, opt = build([(3, dtype)], t)
        fill(opt, params, [[torch.tensor([largest, -largest, largest], dtype=dtype)]] * t)
        opt.apply_surgery()
        assert torch.equal(params[0].grad, torch.tensor([largest, -largest, largest], dtype=dtype))


def test_a_mean_that_overflows_finite_rows_is_refused_as_an_overflow(monkeypatch):
    real = gram_module.combine_checked_

    def overflowing(out, block, weights):
        real(out, block, weights)
        out[0] = torch.inf  # what a rounding beyond the dtype's range would write
        return torch.zeros((), dtype=torch.bool)

    layout = [(4, torch.float32)]
    params, opt = build(layout, 2)
    fill(opt, params, rows_of(layout, 2, seed=3, exponent=0))
    before = snapshot(params, opt)
    monkeypatch.setattr(gram_module, "combine_checked_", overflowing)
    with pytest.raises(NonFiniteGradientError, match="rewritten gradient overflows"):
        opt.step()
    assert unchanged(params, opt, before)
    assert bool((params[0].grad == 0).all())


def test_a_stray_gradient_is_refused_and_kept_and_a_nan_row_is_named_first():
    layout = [(4, torch.float32)]
    rows = rows_of(layout, 2, seed=4, exponent=0)
    params, opt = build(layout, 2)
    fill(opt, params, rows)
    with torch.no_grad():
        params[0].grad[1] = 5.0
    stray = grads(params)
    with pytest.raises(RuntimeError, match="outside every"):
        opt.step()
    assert torch.equal(params[0].grad, stray[0])

    rows[1][0][2] = float("nan")
    fill(opt, params, rows)
    with torch.no_grad():
        params[0].grad[1] = 5.0
    with pytest.raises(NonFiniteGradientError, match="NaN or Inf"):
        opt.step()  # as with the Gram matrix: the non-finite row is named first
    assert torch.equal(params[0].grad, stray[0])


def test_a_grad_scaler_skips_a_non_finite_row_and_backs_off():
    layout = [(4, torch.float32), (2, torch.float32)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    params, opt = build(layout, 3, grad_scaler=scaler)
    rows = rows_of(layout, 3, seed=5, exponent=0)
    rows[2][1][0] = float("inf")
    before = snapshot(params, opt)
    fill(opt, params, rows, scaler.scale)
    scaler.step(opt)
    scaler.update()
    assert opt.last_stats is not None and opt.last_stats.skipped
    assert opt.last_stats.gram is None and not bool(opt.last_stats.weights.any())
    assert scaler.get_scale() == 2.0**7
    assert unchanged(params, opt, before)
    assert all(bool((p.grad == 0).all()) for p in params)


def test_stats_must_be_a_bool_and_shows_in_the_repr():
    with pytest.raises(TypeError, match="stats must be True or False"):
        build([(2, torch.float32)], 2, stats=1)
    _, opt = build([(2, torch.float32)], 2, stats=True)
    assert "stats=True" in repr(opt)
    assert copy.deepcopy(opt).stats

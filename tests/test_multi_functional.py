"""PCGrad, GradVac, MGDA, Uniform and LF-MLF as functions: the properties of docs/lfmlf.md."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery import gram
from gradsurgery.errors import NonFiniteGradientError
from gradsurgery.functional import (
    conflict_orders,
    gradvac_weights,
    lfmlf_weights,
    mgda_weights,
    pcgrad_weights,
    uniform_weights,
)
from gradsurgery.functional.gradvac import gradvac_coefficients
from tests import reference
from tests.sync_guard import no_host_sync


@st.composite
def gradients(draw, min_t=2, max_t=5, max_p=16):
    t = draw(st.integers(min_t, max_t))
    p = draw(st.integers(2, max_p))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    J = rng.standard_normal((t, p)) * 10.0 ** rng.uniform(-1, 1, (t, 1))
    return torch.tensor(J)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- LF-MLF -------------------------------------------------------------------------------


@given(gradients(), st.integers(0, 2**32 - 1))
def test_lfmlf_direction_is_a_common_non_ascent_direction(grads, seed):
    accumulated = torch.tensor(np.random.default_rng(seed).standard_normal(grads.shape[1]))
    w = lfmlf_weights(grads, accumulated)
    d = grads.T @ w
    K = grads @ grads.T
    assert abs(float(w.sum()) - 1) <= 1e-6
    assert bool((w >= -1e-6).all())
    assert bool((grads @ d >= -1e-6 * K.abs().max()).all())


@given(gradients())
def test_lfmlf_first_step_is_the_accumulated_zero_case(grads):
    first = lfmlf_weights(grads)
    zero = lfmlf_weights(grads, torch.zeros(grads.shape[1], dtype=grads.dtype))
    K = (grads @ grads.T).numpy()
    gap = (first - zero).numpy()
    assert float(np.sqrt(max(gap @ K @ gap, 0))) <= 1e-7 * float(np.sqrt(np.trace(K)))


@given(gradients(), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_permuting_the_objectives_permutes_the_weights(grads, seed, perm_seed):
    accumulated = torch.tensor(np.random.default_rng(seed).standard_normal(grads.shape[1]))
    permutation = torch.tensor(np.random.default_rng(perm_seed).permutation(grads.shape[0]))
    d = grads.T @ lfmlf_weights(grads, accumulated)
    w_permuted = lfmlf_weights(grads[permutation], accumulated)
    d_permuted = grads[permutation].T @ w_permuted
    # directions are unique (weights are, where the gradients are independent)
    assert torch.allclose(d, d_permuted, rtol=0, atol=1e-7 * float(grads.norm()))


def test_lfmlf_stays_closer_to_the_start_than_uniform():
    # two objectives whose mean points away from the accumulated direction's opposite
    grads = torch.tensor([[1.0, 0.2], [0.2, 1.0]], dtype=torch.float64)
    accumulated = torch.tensor([3.0, 0.0], dtype=torch.float64)
    w = lfmlf_weights(grads, accumulated)
    lf = (accumulated + grads.T @ w).norm()
    uniform = (accumulated + grads.T @ uniform_weights(grads)).norm()
    assert float(lf) < float(uniform)
    assert float(w[1]) > float(w[0])  # it leans on the objective that lengthens ḡ least


# -- MGDA ---------------------------------------------------------------------------------


@given(gradients(max_t=7))
def test_mgda_common_descent(grads):
    w = mgda_weights(grads)
    d = grads.T @ w
    norm_sq = float(d @ d)
    assert bool((grads @ d >= norm_sq - 1e-9 * float((grads @ grads.T).abs().max())).all())
    expected = reference.min_norm((grads @ grads.T).numpy())
    reference_norm = float((grads.T @ torch.tensor(expected)).norm())
    assert reference_norm >= float(d.norm()) * (1 - 1e-9) - 1e-12 * float(grads.norm())


# -- PCGrad -------------------------------------------------------------------------------


@given(gradients(min_t=2, max_t=2))
def test_pcgrad_leaves_no_conflict_between_two_objectives(grads):
    orders = conflict_orders(2, seeded())
    C = torch.tensor(reference.pcgrad(grads.numpy(), orders.numpy()))
    projected = C  # rows: g_1', g_2'
    scale = 1e-9 * float(grads.norm()) ** 2
    assert float(projected[0] @ grads[1]) >= -scale
    assert float(projected[1] @ grads[0]) >= -scale
    d = grads.T @ pcgrad_weights(grads, seeded())
    assert bool((grads @ d >= -scale).all())


@given(gradients(max_t=6), st.integers(0, 2**32 - 1))
def test_pcgrad_matches_the_loop_over_vectors(grads, seed):
    orders = conflict_orders(grads.shape[0], seeded(seed))
    expected = reference.pcgrad(grads.numpy(), orders.numpy()).sum(axis=0)
    d = grads.T @ pcgrad_weights(grads, seeded(seed))
    assert np.allclose(d.numpy(), expected, rtol=1e-9, atol=1e-9 * float(grads.norm()))


@given(gradients(), st.integers(0, 2**32 - 1))
def test_pcgrad_reductions_differ_by_the_number_of_objectives(grads, seed):
    total = pcgrad_weights(grads, seeded(seed), reduction="sum")
    mean = pcgrad_weights(grads, seeded(seed), reduction="mean")
    assert torch.allclose(total, mean * grads.shape[0])
    assert not torch.allclose(total, mean)


def test_pcgrad_orders_are_random_and_reproducible():
    first = conflict_orders(6, seeded(1))
    assert torch.equal(first, conflict_orders(6, seeded(1)))
    assert not torch.equal(first, conflict_orders(6, seeded(2)))
    for i, row in enumerate(first.tolist()):
        assert sorted(row) == [j for j in range(6) if j != i]


# -- GradVac ------------------------------------------------------------------------------


@given(gradients(max_t=5), st.integers(0, 2**32 - 1), st.floats(-0.5, 0.9))
def test_gradvac_matches_the_loop_over_vectors(grads, seed, target):
    t = grads.shape[0]
    targets = torch.full((t, t), target, dtype=torch.float64)
    orders = conflict_orders(t, seeded(seed))
    expected, expected_targets = reference.gradvac(
        grads.numpy(), targets.numpy(), orders.numpy(), 0.01
    )
    w, new_targets = gradvac_weights(grads, targets, 0.01, seeded(seed))
    assert np.allclose(
        (grads.T @ w).numpy(), expected.sum(axis=0), rtol=1e-8, atol=1e-8 * float(grads.norm())
    )
    assert np.allclose(new_targets.numpy(), expected_targets, atol=1e-10)


@given(gradients(min_t=2, max_t=2), st.floats(0.1, 0.9))
def test_gradvac_raises_a_low_cosine_to_its_target(grads, target):
    targets = torch.full((2, 2), target, dtype=torch.float64)
    K = gram.gram(grads)
    C, new_targets = gradvac_coefficients(K, targets, conflict_orders(2, seeded()), beta=0.01)
    adjusted = C @ grads  # g_1', g_2'
    cosine = float(adjusted[0] @ grads[1] / (adjusted[0].norm() * grads[1].norm()))
    before = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
    if before < target:
        assert cosine == pytest.approx(target, abs=1e-9)
    else:
        assert torch.allclose(adjusted[0], grads[0])
    # the target moves towards the cosine it saw, by beta
    assert float(new_targets[0, 1]) == pytest.approx(0.99 * target + 0.01 * before, abs=1e-12)


def test_gradvac_targets_start_at_zero_and_keep_their_shape():
    grads = torch.randn(3, 10, dtype=torch.float64)
    _, targets = gradvac_weights(grads)
    assert targets.shape == (3, 3)
    with pytest.raises(ValueError, match="targets must have shape"):
        gradvac_weights(grads, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="beta"):
        gradvac_weights(grads, beta=0.0)


# -- shared -------------------------------------------------------------------------------


def test_uniform_weights():
    assert torch.equal(
        uniform_weights(torch.ones(4, 3)), torch.full((4,), 0.25, dtype=torch.float64)
    )


@pytest.mark.parametrize("method", [mgda_weights, lfmlf_weights, pcgrad_weights, uniform_weights])
def test_bad_input_is_refused(method):
    with pytest.raises(ValueError, match="T ≥ 1"):
        method(torch.zeros(0, 5))
    with pytest.raises(ValueError, match=r"\(T, p\)"):
        method(torch.zeros(5))
    bad = torch.ones(3, 5)
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"\[1\]"):
        method(bad)


def test_lfmlf_accumulated_must_match():
    grads = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="accumulated must have shape"):
        lfmlf_weights(grads, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(NonFiniteGradientError):
        lfmlf_weights(grads, torch.full((5,), float("inf"), dtype=torch.float64))


def test_pcgrad_reduction_is_checked():
    with pytest.raises(ValueError, match="reduction"):
        pcgrad_weights(torch.randn(2, 3), reduction="max")


@pytest.mark.parametrize("method", ["pcgrad", "gradvac", "mgda"])
def test_device_paths_need_no_host_sync(method):
    grads = torch.randn(4, 50, dtype=torch.float64)
    K = gram.gram(grads)
    orders = conflict_orders(4, seeded())
    from gradsurgery import simplex_qp
    from gradsurgery.functional.pcgrad import pcgrad_coefficients

    with no_host_sync():
        if method == "pcgrad":
            out = pcgrad_coefficients(K, orders)
        elif method == "gradvac":
            out, _ = gradvac_coefficients(K, torch.zeros_like(K), orders, 0.01)
        else:
            out = simplex_qp.min_norm_weights(K, "enumerate").w
    assert out.isfinite().all()

"""The functional forms on the kinds of matrices their peers test with (issue 17).

TorchJD's aggregator tests draw matrices by their stationarity (strongly stationary:
``vᵀA = 0`` for some ``v > 0``; strictly weakly: only for some ``v ≥ 0`` with zeros; not
weakly stationary), rank-deficient, zero, scaled over many orders of magnitude; the
generator below builds such matrices with its own code (orthonormal factors from NumPy QR),
plus near-opposite pairs. Every property is checked against float64 arithmetic on the same
values.
"""

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import nnls
from torch.overrides import TorchFunctionMode

from gradsurgery import MGDA, qp
from gradsurgery.errors import NonFiniteGradientError
from gradsurgery.functional import (
    conflict_orders,
    gem_project,
    gradvac_weights,
    lfmlf_weights,
    mgda_weights,
    pcgrad_weights,
)
from tests import reference

KINDS = ("normal", "strong", "strictly_weak", "non_weak", "zero", "near_opposite")
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def _orthonormal(rng: np.random.Generator, n: int, against: np.ndarray | None = None) -> np.ndarray:
    """``n``-row orthonormal columns, orthogonal to the columns of ``against`` if given."""
    A = rng.standard_normal((n, n))
    if against is not None:
        A = A - against @ (against.T @ A)
    q, _ = np.linalg.qr(A)
    if against is None:
        return q
    # the first n - k columns of QR span the complement of ``against``
    return q[:, : n - against.shape[1]]


def matrix(kind: str, m: int, n: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    """An ``(m, n)`` matrix of the given kind and rank (``rank < m`` for the stationary ones)."""
    singular = np.abs(rng.standard_normal(rank)) + 0.1
    Vt = _orthonormal(rng, n).T[:rank]
    if kind == "zero":
        return np.zeros((m, n))
    if kind == "normal":
        U = _orthonormal(rng, m)[:, :rank]
    elif kind == "near_opposite":
        A = rng.standard_normal((m, n))
        A[1] = -rng.uniform(0.3, 3) * A[0] + 10.0 ** rng.uniform(-8, -3) * np.linalg.norm(
            A[0]
        ) * rng.standard_normal(n) / np.sqrt(n)
        return A
    else:
        u = np.abs(rng.standard_normal(m)) + 0.05
        if kind == "strong":  # vᵀA = 0 for v = u > 0
            U = _orthonormal(rng, m, (u / np.linalg.norm(u))[:, None])[:, :rank]
        elif kind == "non_weak":  # u > 0 a left singular vector: no v ≥ 0 with vᵀA = 0
            rest = _orthonormal(rng, m, (u / np.linalg.norm(u))[:, None])
            U = np.hstack([(u / np.linalg.norm(u))[:, None], rest])[:, :rank]
        else:  # strictly weak: v ≥ 0 with zeros is orthogonal to A, v' ≥ 0 is not
            split = int(rng.integers(1, m))
            order = rng.permutation(m)
            v, v_prime = np.zeros(m), np.zeros(m)
            v[order[:split]] = u[order[:split]]
            v_prime[order[split:]] = u[order[split:]]
            pair = np.stack([v / np.linalg.norm(v), v_prime / np.linalg.norm(v_prime)], axis=1)
            rest = _orthonormal(rng, m, pair)
            U = np.hstack([pair[:, 1:], rest])[:, :rank]
    return U @ np.diag(singular) @ Vt


@st.composite
def matrices(draw: st.DrawFn, kinds: tuple[str, ...] = KINDS, max_m: int = 8) -> torch.Tensor:
    """A peer-style matrix, scaled by 10^[-6, 6], in float32 or float64."""
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = int(rng.integers(2, max_m + 1))
    n = int(rng.integers(2, 14))
    top = min(m - 1, n) if kind in ("strong", "strictly_weak") else min(m, n)
    rank = int(rng.integers(1, top + 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    A = matrix(kind, m, n, rank, rng) * 10.0 ** rng.uniform(-6, 6)
    return torch.tensor(A, dtype=dtype)


def resolution(A: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """How close to zero a direction computed from the Gram of ``A`` can be: ``10√ε max‖a_t‖``."""
    return 10 * EPS[dtype or A.dtype] ** 0.5 * float(A.double().norm(dim=1).max())


def feasibility_allowance(g: torch.Tensor, J: torch.Tensor, tolerance: float) -> torch.Tensor:
    """What ``⟨g_k, x⟩`` may lack of 0: the certificate's ``τ‖g‖‖g_k‖`` plus the rounding of
    forming ``x = g + Jᵀv`` in the gradients' dtype, ``ε (‖g‖ + Σ_j v_j ‖g_j‖)``, with the
    multipliers of an independent float64 reference (SciPy's NNLS on unit rows).
    """
    g64, J64 = g.double().numpy(), J.double().numpy()
    norms = np.linalg.norm(J64, axis=1)
    unit = J64 / np.where(norms > 0, norms, 1.0)[:, None]
    u, _ = nnls(unit.T, -g64, maxiter=100 * len(J64))
    terms = np.linalg.norm(g64) + u.sum()
    scale = tolerance * np.linalg.norm(g64) + 16 * EPS[g.dtype] * terms * len(J64)
    return torch.tensor(scale * norms)


# -- GEM: a valid input gets an answer ------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(matrices(max_m=9), st.sampled_from([0.0, 0.5]))
def test_gem_answers_every_peer_matrix_and_meets_the_constraints(A, margin):
    g, J = A[0], A[1:]
    x = gem_project(g, J, margin)
    assert bool(x.isfinite().all())
    if margin == 0.0:
        tolerance = qp.kkt_tolerance(J.shape[0], [A.dtype])
        allowance = feasibility_allowance(g, J, tolerance)
        assert bool((J.double() @ x.double() >= -allowance).all())


def strictly_weak_fp32(seed: int) -> torch.Tensor:
    return torch.tensor(
        matrix("strictly_weak", 20, 10, 10, np.random.default_rng(seed)), dtype=torch.float32
    )


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_issue17_strictly_weak_fp32_rank_deficient_constraints_are_answered(margin):
    # 20 rows of rank 10 in 10 dimensions: the fp32-accumulated Gram is indefinite (about
    # -2e-7 on its unit diagonal) and DAQP gave no answer on some of them
    generator = torch.Generator().manual_seed(0)
    for seed in range(12):
        A = strictly_weak_fp32(seed)
        for g in (A[0], A.sum(dim=0), torch.randn(10, generator=generator)):
            J = A if g is not A[0] else A[1:]
            x = gem_project(g, J, margin)
            if margin == 0.0:
                tolerance = qp.kkt_tolerance(J.shape[0], [torch.float32])
                allowance = feasibility_allowance(g, J, tolerance)
                assert bool((J.double() @ x.double() >= -allowance).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", ["auto", "daqp"])
@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_issue17_near_opposite_constraints_are_answered_and_met(dtype, solver, margin):
    # J₁ = −3·J₀ plus 1e-6 relative noise: multipliers of ~1e6 are needed
    for seed in range(16):
        rng = np.random.default_rng(seed)
        p = int(rng.choice([10, 100, 1000]))
        J = rng.standard_normal((int(rng.integers(2, 5)), p))
        J[1] = -3 * J[0] + 1e-6 * np.linalg.norm(J[0]) * rng.standard_normal(p) / np.sqrt(p)
        g = rng.standard_normal(p) - 2 * J[0] / np.linalg.norm(J[0]) * np.sqrt(p)
        g_t, J_t = torch.tensor(g, dtype=dtype), torch.tensor(J, dtype=dtype)
        x = gem_project(g_t, J_t, margin, solver=solver)
        if margin == 0.0:
            tolerance = qp.kkt_tolerance(J.shape[0], [dtype])
            allowance = feasibility_allowance(g_t, J_t, tolerance)
            assert bool((J_t.double() @ x.double() >= -allowance).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_issue17_many_constraints_with_a_near_opposite_pair_are_answered(dtype):
    # 9-20 constraints of scales 1e-3..1e3, J₁ = −3·J₀ to a relative 1e-6: with margin=0.5
    # DAQP gave no answer on 27 (fp32) and 29 (fp64) of these 104 problems
    for seed in range(104):
        rng = np.random.default_rng(seed)
        p, t = int(rng.integers(2, 50)), int(rng.integers(9, 21))
        J = rng.standard_normal((t, p)) * 10.0 ** rng.uniform(-3, 3, (t, 1))
        J[1] = -3 * J[0] * (1 + 1e-6 * rng.standard_normal(p))
        g = rng.standard_normal(p) * 10.0 ** rng.uniform(-3, 3)
        g_t, J_t = torch.tensor(g, dtype=dtype), torch.tensor(J, dtype=dtype)
        for margin in (0.0, 0.5):
            x = gem_project(g_t, J_t, margin)
            assert bool(x.isfinite().all())
        allowance = feasibility_allowance(g_t, J_t, qp.kkt_tolerance(t, [dtype]))
        assert bool((J_t.double() @ gem_project(g_t, J_t).double() >= -allowance).all())


# -- MGDA, PCGrad, LF-MLF on the same matrices ----------------------------------------------


@settings(max_examples=80, deadline=None)
@given(matrices(), st.integers(0, 2**32 - 1))
def test_mgda_is_non_conflicting_and_permutation_invariant(A, seed):
    w = mgda_weights(A)
    d = A.double().T @ w
    norms = A.double().norm(dim=1)
    assert abs(float(w.sum()) - 1) <= 1e-9 and bool((w >= 0).all())
    # Near a Pareto-stationary point the min-norm point of a rounded Gram is zero only to
    # its rounding: ‖d‖² of ε‖g‖², so ‖d‖ of √ε‖g‖, and a conflict of that size may remain.
    slack = resolution(A) * norms
    assert bool((A.double() @ d >= float(d @ d) - slack).all())
    permutation = torch.tensor(np.random.default_rng(seed).permutation(A.shape[0]))
    d_permuted = A[permutation].double().T @ mgda_weights(A[permutation])
    # the same problem up to the Gram's rounding, which depends on the rows' order
    agreement = 1e-3 if A.dtype == torch.float32 else 1e-6
    assert float((d - d_permuted).norm()) <= agreement * float(norms.max())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["normal", "strong", "near_opposite"]))
def test_mgda_above_eight_objectives_is_the_min_norm_point(seed, kind):
    # the host path (NNLS form through the exact bound-constrained solver), against SciPy's
    # NNLS on the vectors themselves: min ‖Σ u_t (g_t, 1) − e‖, w = u / Σu
    rng = np.random.default_rng(seed)
    t, p = int(rng.integers(9, 17)), int(rng.integers(3, 40))
    rank = int(rng.integers(1, min(t - 1, p) + 1))
    A = torch.tensor(matrix(kind, t, p, rank, rng) * 10.0 ** rng.uniform(-3, 3))
    w = mgda_weights(A)
    augmented = np.vstack([A.numpy().T, np.ones((1, t))])
    u, _ = nnls(augmented, np.eye(p + 1)[-1], maxiter=100 * t)
    w_ref = torch.tensor(u / u.sum())
    K = A @ A.T
    scale = float(K.diagonal().max())
    assert abs(float(w.sum()) - 1) <= 1e-9 and bool((w >= 0).all())
    assert float(w @ K @ w) <= float(w_ref @ K @ w_ref) + 1e-9 * scale
    d = A.T @ w
    assert bool((A @ d >= float(d @ d) - resolution(A) * A.norm(dim=1)).all())


@settings(max_examples=40, deadline=None)
@given(matrices(kinds=("strong",)))
def test_mgda_is_zero_on_strongly_stationary_matrices(A):
    d = A.double().T @ mgda_weights(A)
    assert float(d.norm()) <= resolution(A)


@settings(max_examples=60, deadline=None)
@given(matrices(kinds=("normal", "strictly_weak", "non_weak", "zero", "near_opposite")))
def test_lfmlf_is_non_conflicting_on_peer_matrices(A):
    d = A.double().T @ lfmlf_weights(A)
    norms = A.double().norm(dim=1)
    slack = (1e-5 * float(d.norm()) + resolution(A)) * norms
    assert bool((A.double() @ d >= -slack).all())


@settings(max_examples=60, deadline=None)
@given(matrices(), st.integers(0, 2**32 - 1))
def test_pcgrad_is_the_loop_over_vectors_on_peer_matrices(A, seed):
    orders = conflict_orders(A.shape[0], torch.Generator().manual_seed(seed))
    w = pcgrad_weights(A, torch.Generator().manual_seed(seed))
    expected = reference.pcgrad(A.double().numpy(), orders.numpy()).sum(axis=0)
    scale = float(A.double().norm(dim=1).max())
    tolerance = (1e-3 if A.dtype == torch.float32 else 1e-9) * scale
    assert np.abs((A.double().T @ w).numpy() - expected).max() <= tolerance


# -- finiteness is read from the Gram, not from another pass --------------------------------


class _RecordIsfinite(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.isfinite, torch.Tensor.isfinite):
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "function",
    [
        mgda_weights,
        pcgrad_weights,
        lambda grads: gradvac_weights(grads)[0],
        lfmlf_weights,
    ],
)
def test_finite_input_is_not_read_again_for_finiteness(function: Callable[..., object]):
    grads = torch.randn(3, 5000)
    with _RecordIsfinite() as recorder:
        function(grads)
    assert all(size < grads.numel() for size in recorder.sizes), recorder.sizes


@pytest.mark.parametrize("function", [mgda_weights, pcgrad_weights, lfmlf_weights])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_still_named(function, bad):
    grads = torch.randn(3, 50)
    grads[1, 7] = bad
    with pytest.raises(NonFiniteGradientError, match=r"rows \[1\]"):
        function(grads)


@pytest.mark.parametrize("function", [mgda_weights, pcgrad_weights])
def test_finite_fp32_gradients_whose_squares_overflow_are_accepted(function):
    grads = torch.tensor([[1e25, 2e24, 0.0], [-1e25, 3e24, 1e24]], dtype=torch.float32)
    w = function(grads)
    expected = function(grads.double())
    assert torch.allclose(w, expected, rtol=1e-6)


# -- GradVac in float32 on near-opposite pairs ----------------------------------------------


def _gradvac_loop_fp32(grads: torch.Tensor, target: float, orders: torch.Tensor) -> torch.Tensor:
    """GradVac as a float32 loop over the vectors (LibMTL's structure)."""
    out = grads.clone()
    for i in range(len(grads)):
        for j in orders[i].tolist():
            norm_i, norm_j = out[i].norm(), grads[j].norm()
            phi = (out[i] @ grads[j] / (norm_i * norm_j)).clamp(-1, 1)
            if phi < target:
                root = (1 - torch.tensor(target) ** 2).sqrt()
                shift = norm_i * (target * (1 - phi**2).sqrt() - phi * root) / (norm_j * root)
                out[i] += shift * grads[j]
    return out.sum(dim=0)


def test_issue17_gradvac_fp32_near_opposite_is_as_accurate_as_a_fp32_loop():
    worst_ours, worst_loop = 0.0, 0.0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        p = int(rng.integers(10, 2000))
        g0 = rng.standard_normal(p)
        noise = 10.0 ** rng.uniform(-7, -2) * np.linalg.norm(g0) / np.sqrt(p)
        g1 = -rng.uniform(0.3, 3) * g0 + noise * rng.standard_normal(p)
        grads = torch.tensor(np.stack([g0, g1]), dtype=torch.float32)
        target = float(rng.uniform(-0.5, 0.9))
        orders = conflict_orders(2, torch.Generator().manual_seed(seed))
        exact, _ = reference.gradvac(
            grads.double().numpy(), np.full((2, 2), target), orders.numpy(), 0.5
        )
        w, _ = gradvac_weights(
            grads, torch.full((2, 2), target), 0.5, torch.Generator().manual_seed(seed)
        )
        scale = float(grads.double().norm(dim=1).max())
        ours = (grads.T @ w.float()).double().numpy()
        loop = _gradvac_loop_fp32(grads, target, orders).double().numpy()
        worst_ours = max(worst_ours, np.linalg.norm(ours - exact.sum(axis=0)) / scale)
        worst_loop = max(worst_loop, np.linalg.norm(loop - exact.sum(axis=0)) / scale)
    assert worst_ours <= min(worst_loop, 1e-6), (worst_ours, worst_loop)


# -- MGDA's gradient normalisation ----------------------------------------------------------


def _normalizers(grads: torch.Tensor, normalization: str, losses: torch.Tensor) -> torch.Tensor:
    norms = grads.double().norm(dim=1)
    return {
        "none": torch.ones_like(norms),
        "l2": norms,
        "loss": losses.double(),
        "loss+": losses.double() * norms,
    }[normalization]


@settings(max_examples=60, deadline=None)
@given(
    matrices(kinds=("normal", "non_weak", "near_opposite")),
    st.sampled_from(["none", "l2", "loss", "loss+"]),
    st.integers(0, 2**32 - 1),
)
def test_normalised_mgda_is_the_min_norm_point_of_the_normalised_gradients(A, normalization, seed):
    losses = torch.tensor(10.0 ** np.random.default_rng(seed).uniform(-3, 3, A.shape[0]))
    n = _normalizers(A, normalization, losses)
    n = torch.where(n > 0, n, torch.ones_like(n))
    w = mgda_weights(A, normalization=normalization, losses=losses)
    normalised = A.double() / n[:, None]
    expected = torch.tensor(reference.min_norm((normalised @ normalised.T).numpy()))
    d, d_expected = A.double().T @ w, normalised.T @ expected
    assert float((d - d_expected).norm()) <= resolution(normalised, A.dtype)
    norms = A.double().norm(dim=1)  # a positive rescaling of each g_t: still common descent
    slack = (1e-5 * float(d.norm()) + resolution(normalised, A.dtype)) * norms
    assert bool((A.double() @ d >= -slack).all())


def test_l2_normalised_mgda_ignores_the_gradients_scales():
    grads = torch.randn(3, 20, dtype=torch.float64)
    scaled = grads * torch.tensor([[1e-4], [1.0], [1e5]], dtype=torch.float64)
    d = grads.T @ mgda_weights(grads, normalization="l2")
    d_scaled = scaled.T @ mgda_weights(scaled, normalization="l2")
    assert torch.allclose(d, d_scaled, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("losses", "match"),
    [
        (None, "pass losses="),
        (torch.tensor([1.0, 0.0]), "finite losses > 0"),
        (torch.tensor([1.0, float("nan")]), "finite losses > 0"),
        (torch.tensor([1.0, 2.0, 3.0]), r"shape \(2,\)"),
    ],
)
def test_loss_normalisation_refuses_losses_it_cannot_divide_by(losses, match):
    with pytest.raises(ValueError, match=match):
        mgda_weights(torch.randn(2, 5), normalization="loss", losses=losses)


def test_an_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalization must be one of"):
        mgda_weights(torch.randn(2, 5), normalization="l1")


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_the_wrapper_steps_as_the_functional_form(normalization):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 6, generator=generator)
    start = torch.randn(6, generator=generator)
    weight = torch.nn.Parameter(start.clone())
    opt = MGDA(torch.optim.SGD([weight], lr=1.0), 3, normalization=normalization)
    losses = [((weight - row) ** 2).sum() for row in rows]
    opt.backward(losses)
    opt.step()
    grads = 2 * (start - rows)
    values = torch.stack([loss.detach() for loss in losses])
    w = mgda_weights(grads, normalization=normalization, losses=values)
    step = (start - weight.detach()).double()
    assert torch.allclose(step, grads.double().T @ w, rtol=1e-5, atol=1e-6)


def test_the_wrapper_needs_the_losses_for_loss_normalisation():
    weight = torch.nn.Parameter(torch.ones(4))
    opt = MGDA(torch.optim.SGD([weight], lr=1.0), ["a", "b"], normalization="loss")
    for name, sign in (("a", 1.0), ("b", -2.0)):
        with opt.objective(name):
            (sign * weight).sum().backward()
    with pytest.raises(RuntimeError, match="needs this step's losses"):
        opt.step()
    assert torch.equal(weight.detach(), torch.ones(4))


def test_loss_normalisation_with_a_grad_scaler_is_refused():
    weight = torch.nn.Parameter(torch.ones(4))
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="grad_scaler"):
        MGDA(torch.optim.SGD([weight], lr=1.0), 2, normalization="loss+", grad_scaler=scaler)

"""MGDA's min-norm point and LF-MLF's Problem 2, against brute force and their KKT conditions."""

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from gradsurgery import simplex_qp
from gradsurgery.errors import SolverError
from tests import reference
from tests.sync_guard import no_host_sync


@st.composite
def objective_gradients(draw, max_t=5, max_p=12):
    """(J, ḡ): T gradients with scales spread over 1e-3…1e3, sometimes duplicated or T > p."""
    t = draw(st.integers(2, max_t))
    p = draw(st.integers(1, max_p))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    J = rng.standard_normal((t, p)) * 10.0 ** rng.uniform(-3, 3, (t, 1))
    if draw(st.booleans()):
        J[-1] = J[0] * 10.0 ** rng.uniform(-1, 1)
    accumulated = rng.standard_normal(p) * 10.0 ** rng.uniform(-3, 3)
    return J, accumulated


def objective(K: np.ndarray, c: np.ndarray, w: np.ndarray) -> float:
    return float(0.5 * w @ K @ w + c @ w)


def problem_scale(K: np.ndarray, c: np.ndarray) -> float:
    """The size of the objective's terms: optimality is measured relative to it."""
    return float(np.max(np.diag(K)) + np.abs(c).max())


@pytest.mark.parametrize("solver", ["enumerate", "daqp", "osqp"])
@given(problem=objective_gradients(max_t=6))
def test_min_norm_point_matches_brute_force_and_its_kkt(solver, problem):
    J, _ = problem
    K = J @ J.T
    try:
        solution = simplex_qp.min_norm_weights(torch.tensor(K), solver)
    except SolverError:
        # OSQP (ADMM) may give up when gradient norms differ by orders of magnitude; it
        # must then say so. The defaults (enumeration, DAQP) must not.
        assert solver == "osqp"
        return
    w = solution.w.numpy()
    assert abs(w.sum() - 1) <= 1e-9 and np.all(w >= 0)
    # MGDA's guarantee: ⟨d, g_t⟩ ≥ ‖d‖² for every objective
    Kw = K @ w
    scale = np.abs(K).max()
    assert np.all(Kw >= w @ Kw - 1e-7 * scale)
    # no worse than an independent exact method (brute force over supports)
    zero = np.zeros(len(K))
    w_ref = reference.min_norm(K)
    assert objective(K, zero, w) <= objective(K, zero, w_ref) + 1e-12 * scale
    assert float(solution.kkt_residual) <= 1e-7


@pytest.mark.parametrize("solver", ["daqp", "osqp", "clarabel"])
@given(problem=objective_gradients(max_t=4))
# norms 2.3e6 apart in one dimension: the reference once missed this optimum (a vertex)
@example(
    problem=(
        np.array([[809.3420280994889], [85.99314999527707], [3.497638047530177e-04]]),
        np.array([-1446.9116704965886]),
    )
)
def test_lfmlf_problem_2_matches_brute_force(solver, problem):
    J, accumulated = problem
    K, c = J @ J.T, J @ accumulated
    try:
        solution = simplex_qp.lfmlf_qp(torch.tensor(K), torch.tensor(c), solver)
    except SolverError:
        # OSQP and Clarabel may give up on gradients whose norms differ by orders of
        # magnitude, or on a Pareto-stationary problem (the feasible set can collapse to a
        # point); they must then say so. The default, DAQP, must not.
        assert solver != "daqp"
        return
    w = solution.w.numpy()
    # feasibility to the tolerances docs/lfmlf.md states
    assert abs(w.sum() - 1) <= 1e-6
    assert np.all(w >= -1e-6)
    assert np.all(K @ w >= -1e-6 * np.abs(K).max())
    # and on each language's own scale: d raises no loss to first order, however small
    # that language's gradient is next to the others'
    norms = np.sqrt(np.diag(K))
    assert np.all(K @ w >= -1e-6 * norms * norms.max())
    # optimality: no worse than an independent exact method (brute force over active sets),
    # and certified by the KKT conditions
    w_ref = reference.lfmlf(K, c)
    if np.all(K @ w_ref >= -1e-12 * np.max(np.diag(K))):  # the brute force's own solves are
        # float64 least squares: compare only where its answer is feasible
        assert objective(K, c, w) <= objective(K, c, w_ref) + 1e-9 * problem_scale(K, c)
        # d = Jᵀw is unique (the objective is strictly convex in d): the same direction
        gap = w - w_ref
        assert np.sqrt(max(gap @ K @ gap, 0.0)) <= 1e-6 * np.sqrt(np.max(np.diag(K)))
    assert float(solution.kkt_residual) <= 1e-6


def test_the_certificate_rejects_a_feasible_point_that_is_not_optimal():
    J = np.array([[1.0, 0.0], [0.0, 1.0]])
    K, c = J @ J.T, J @ np.array([1.0, 0.0])
    optimum = simplex_qp.lfmlf_qp(torch.tensor(K), torch.tensor(c))
    assert float(optimum.kkt_residual) < 1e-9
    feasible = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert float(simplex_qp.lfmlf_kkt_residual(torch.tensor(K), torch.tensor(c), feasible)) > 1e-2


def test_min_norm_on_the_device_needs_no_host_sync():
    K = torch.randn(6, 20, dtype=torch.float64)
    K = K @ K.T
    with no_host_sync():
        w = simplex_qp.min_norm_weights(K, "enumerate").w
    assert abs(float(w.sum()) - 1) < 1e-12


def test_lfmlf_needs_a_qpsolvers_backend():
    K = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="qpsolvers backend"):
        simplex_qp.lfmlf_qp(K, torch.zeros(2, dtype=torch.float64), "enumerate")
    with pytest.raises(ValueError, match="not installed"):
        simplex_qp.lfmlf_qp(K, torch.zeros(2, dtype=torch.float64), "gurobi")


def test_an_inexact_solution_is_reported():
    solution = simplex_qp.SimplexSolution(torch.ones(2), torch.tensor(1e-3))
    with pytest.raises(SolverError, match="KKT residual"):
        simplex_qp.raise_if_inexact(solution, "a problem", 1e-6)

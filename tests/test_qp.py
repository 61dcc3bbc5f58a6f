"""The lower-bounded QP solvers against each other and against SciPy's NNLS."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery import qp
from gradsurgery.errors import SolverError
from tests import reference
from tests.strategies import problems
from tests.sync_guard import HostSyncError, no_host_sync

SOLVERS = ["enumerate", "daqp", "osqp", "quadprog", "clarabel"]


def problem(seed: int, t: int, p: int, margin: float = 0.0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((t, p)) * scale * np.exp(rng.uniform(-2, 2, (t, 1)))
    g = rng.standard_normal(p) * scale - J.sum(axis=0) / t
    K = torch.tensor(J @ J.T)
    b = torch.tensor(J @ g)
    lower = torch.full((t,), margin, dtype=torch.float64)
    return g, J, K, b, lower


@pytest.mark.parametrize("solver", SOLVERS)
@given(seed=st.integers(0, 2**32 - 1), t=st.integers(1, 6), margin=st.sampled_from([0.0, 0.3]))
def test_solvers_match_nnls_reference(solver, seed, t, margin):
    g, J, K, b, lower = problem(seed, t, 40, margin)
    v = qp.solve_lower_bounded(K, b, lower, solver).v.numpy()
    x = g + J.T @ v
    x_ref = reference.solve_dual(g, J, margin)
    tolerance = 1e-7 if solver == "clarabel" else 1e-8
    assert np.linalg.norm(x - x_ref) <= tolerance * max(1.0, np.linalg.norm(g))
    assert np.all(v >= margin)


@pytest.mark.parametrize("solver", ["enumerate", "daqp", "osqp"])
@pytest.mark.parametrize("case", ["duplicate", "zero_row", "more_rows_than_dims"])
def test_singular_gram_is_solved_exactly(solver, case):
    rng = np.random.default_rng(3)
    if case == "duplicate":
        J = rng.standard_normal((3, 30))
        J = np.vstack([J, J[0]])
    elif case == "zero_row":
        J = rng.standard_normal((4, 30))
        J[2] = 0
    else:
        J = rng.standard_normal((7, 4))
    g = rng.standard_normal(J.shape[1]) - J[:2].sum(axis=0)
    K, b = torch.tensor(J @ J.T), torch.tensor(J @ g)
    solution = qp.solve_lower_bounded(K, b, torch.zeros(len(J), dtype=torch.float64), solver)
    x = g + J.T @ solution.v.numpy()
    assert np.linalg.norm(x - reference.project(g, J)) <= 1e-8 * np.linalg.norm(g)
    assert float(solution.kkt_residual) <= 1e-9


def test_quadprog_on_a_singular_gram_solves_a_nearby_problem_and_is_certified():
    J = np.ones((2, 5))
    K, b = torch.tensor(J @ J.T), torch.tensor(J @ -np.ones(5))
    with pytest.raises(SolverError, match="quadprog"):  # the backend alone refuses it
        qp.backend_solve("quadprog", K.numpy(), b.numpy(), lb=np.zeros(2))
    solution = qp.solve_lower_bounded(K, b, torch.zeros(2, dtype=torch.float64), "quadprog")
    assert float(solution.kkt_residual) <= 1e-9
    x = -np.ones(5) + J.T @ solution.v.numpy()  # the projection of -1 onto {x: Σx ≥ 0} is 0
    assert np.abs(x).max() <= 1e-9


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3])
def test_scale_of_the_gradients_does_not_matter(scale):
    _, _, K, b, lower = problem(11, 5, 50, scale=scale)
    v = qp.solve_lower_bounded(K, b, lower, "daqp").v
    v_unit = qp.solve_lower_bounded(K / scale**2, b / scale**2, lower, "daqp").v
    assert torch.allclose(v, v_unit, rtol=1e-9, atol=1e-12 * float(v.abs().max()))


def test_kkt_residual_is_zero_at_the_optimum_and_positive_elsewhere():
    _, _, K, b, lower = problem(5, 4, 30)
    solution = qp.solve_lower_bounded(K, b, lower, "enumerate")
    assert float(solution.kkt_residual) < 1e-12
    assert float(qp.kkt_residual(K, b, lower, solution.v * 1.5 + 0.1)) > 1e-3
    assert float(qp.kkt_residual(K, b, lower, -solution.v - 1)) > 1e-3


def test_closed_form_matches_enumeration_for_one_constraint():
    _, _, K, b, lower = problem(8, 1, 20, margin=0.2)
    closed = qp.solve_lower_bounded(K, b, lower, "closed_form").v
    enumerated = qp.solve_lower_bounded(K, b, lower, "enumerate").v
    assert torch.allclose(closed, enumerated, rtol=1e-12)


def test_auto_solves_on_the_device_up_to_max_enumerate():
    assert qp.resolve_solver("auto", 1) == "closed_form"
    assert qp.resolve_solver("auto", 2) == "enumerate"
    assert qp.resolve_solver("auto", qp.MAX_ENUMERATE) == "enumerate"
    assert qp.resolve_solver("auto", qp.MAX_ENUMERATE + 1) == "daqp"
    assert not qp.is_host_solver("enumerate")
    assert qp.is_host_solver("daqp")


def test_enumeration_does_not_synchronise():
    _, _, K, b, lower = problem(2, 6, 25)
    with no_host_sync():
        solution = qp.solve_lower_bounded(K, b, lower, "auto")
    assert float(solution.kkt_residual) < 1e-12


def test_the_guard_catches_a_host_read():
    with no_host_sync(), pytest.raises(HostSyncError):
        bool(torch.ones(1) > 0)


def test_bad_solver_names_are_rejected_with_the_choices():
    _, _, K, b, lower = problem(0, 2, 10)
    with pytest.raises(ValueError, match="daqp"):
        qp.solve_lower_bounded(K, b, lower, "no-such-solver")
    with pytest.raises(ValueError, match="exactly one"):
        qp.solve_lower_bounded(K, b, lower, "closed_form")


@pytest.mark.parametrize("solver", ["daqp", "osqp"])
@given(problem=problems(max_t=16, max_p=12))
def test_host_backends_are_exact_on_degenerate_problems(solver, problem):
    # many constraints in few dimensions: a singular Gram, where backends alone stop early
    J, g = problem.J.numpy(), problem.g.numpy()
    K, b = torch.tensor(J @ J.T), torch.tensor(J @ g)
    try:
        solution = qp.solve_lower_bounded(K, b, torch.zeros(len(J), dtype=torch.float64), solver)
    except SolverError:
        # OSQP may give no answer on such problems (a clear error; GEM then falls back to
        # DAQP: tests/test_gem_dependent.py); DAQP always answers
        assert solver == "osqp"
        return
    v = solution.v.numpy()
    scale = np.linalg.norm(g) + float(np.sum(np.abs(v) * np.linalg.norm(J, axis=1)))
    assert np.linalg.norm(g + J.T @ v - reference.solve_dual(g, J)) <= 1e-9 * scale
    assert float(solution.kkt_residual) <= 1e-9


def test_the_kkt_tolerance_follows_the_grams_precision():
    assert qp.kkt_tolerance(4, [torch.float64]) == qp.KKT_TOLERANCE
    assert qp.kkt_tolerance(1, [torch.float32]) == qp.KKT_TOLERANCE
    coarse = qp.kkt_tolerance(8, [torch.bfloat16, torch.float64])
    assert coarse == 8 * 8 * torch.finfo(torch.float32).eps > qp.KKT_TOLERANCE

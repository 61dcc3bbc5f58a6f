"""GEM on linearly dependent constraints: the certificate, the exact fallback, the references.

Dependent rows (rank-deficient ``J``, ``t > p``, duplicated or negated rows, cones equal to
{0}) give singular subsystems that an LU solve may return with multipliers ~1e16 and a
computed residual of ~0; the certificate of ``qp.kkt_residual`` must see through them.
"""

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from gradsurgery import GEMProjector, qp, qp_host, sync
from gradsurgery import gram as gram_module
from gradsurgery.errors import SolverError
from gradsurgery.functional import gem_multipliers, gem_project
from gradsurgery.functional.gem import FALLBACK_SOLVER
from tests import reference
from tests.strategies import Problem, dependent_problems
from tests.sync_guard import no_host_sync

# The projection is compared to the references to RTOL · ‖g‖, and every constraint is met
# to FEASIBILITY · ‖g‖ · ‖g_k‖ (the library certifies 1e-6; it reaches ~1e-12).
RTOL = 1e-7
FEASIBILITY = 1e-9

ISSUE_G = [5.0, 4.0]
ISSUE_J = [[0.0, 5.0], [1.0, 1.0], [2.0, -1.0], [-5.0, 1.0], [-3.0, -3.0]]


def stacked_gram(problem: Problem) -> torch.Tensor:
    return gram_module.gram(torch.cat([problem.g[None], problem.J]))


def assert_feasible(problem: Problem, x: torch.Tensor) -> None:
    bound = FEASIBILITY * problem.g.norm() * problem.J.norm(dim=1)
    assert torch.all(problem.J @ x >= -bound), (problem.J @ x, bound)


def assert_is_the_projection(problem: Problem, x: torch.Tensor) -> None:
    assert_feasible(problem, x)
    x_ref = reference.project_brute(problem.g.numpy(), problem.J.numpy())
    assert np.linalg.norm(x.numpy() - x_ref) <= RTOL * float(problem.g.norm())


@pytest.mark.parametrize("solver", ["auto", "enumerate", "daqp"])
@pytest.mark.parametrize("validate", [True, False])
def test_issue_dependent_rows_project_to_zero(solver, validate):
    g = torch.tensor(ISSUE_G, dtype=torch.float64)
    J = torch.tensor(ISSUE_J, dtype=torch.float64)
    x = gem_project(g, J, solver=solver, validate=validate)
    assert torch.all(J @ x >= -1e-12)
    assert float(x.norm()) <= 1e-12


def test_the_certificate_is_not_fooled_by_huge_multipliers():
    # what the enumeration returned for the issue's example: a singular 3x3 subsystem
    # solved as if it were regular; the old residual, divided by 1 + |v|, was 2e-17
    g = torch.tensor(ISSUE_G, dtype=torch.float64)
    J = torch.tensor(ISSUE_J, dtype=torch.float64)
    fooled = torch.tensor([0.0, 2.8061e16, 0.0, 1.4147, 9.3536e15], dtype=torch.float64)
    K, b, lower = J @ J.T, J @ g, torch.zeros(5, dtype=torch.float64)
    assert float(qp.kkt_residual(K, b, lower, fooled, g.norm())) > 1.0
    exact = qp.solve_lower_bounded(K, b, lower, "enumerate", g.norm())
    assert float(exact.kkt_residual) < 1e-12
    assert float(qp.kkt_residual(K, b, lower, exact.v, g.norm())) < 1e-12


def test_the_certificate_is_relative_to_the_gradients_norm():
    # a thin cone: g is nearly orthogonal to both rows, ⟨g, g_k⟩ ~ 1e-5 ‖g‖ ‖g_k‖
    J = torch.tensor([[1.0, 1e-5], [-1.0, 1e-5]], dtype=torch.float64)
    problem = Problem(torch.tensor([0.3, -1.0], dtype=torch.float64), J)
    assert_is_the_projection(problem, gem_project(problem.g, problem.J))


@given(dependent_problems())
def test_dependent_constraints_give_the_exact_projection(problem):
    assert_is_the_projection(problem, gem_project(problem.g, problem.J))


@given(dependent_problems())
def test_dependent_constraints_on_the_device_path_without_fallback(problem):
    with no_host_sync():
        x = gem_project(problem.g, problem.J, validate=False)
    assert_is_the_projection(problem, x)


@settings(max_examples=15)
@given(dependent_problems(max_p=1000, kinds=("low_rank",)))
def test_rank_deficient_rows_in_many_dimensions(problem):
    if problem.J.shape[1] < 500:
        problem = Problem(
            torch.cat([problem.g, problem.g.new_zeros(500)]),
            torch.cat([problem.J, problem.J.new_zeros(problem.t, 500)], dim=1),
        )
    x = gem_project(problem.g, problem.J)
    assert_is_the_projection(problem, x)
    assert float(x.norm()) <= float(problem.g.norm()) * (1 + RTOL)


@pytest.mark.parametrize("seed", [5, 40])
def test_issue_rank_one_rows_in_hundreds_of_dimensions(seed):
    # seven multiples of one vector (both signs) in p = 836 and 781: the enumeration used to
    # return x with a cosine of -0.076 (-0.054) to a memory gradient and ‖x‖ > ‖g‖
    rng = np.random.default_rng(seed)
    p, t = int(rng.integers(500, 1001)), int(rng.integers(3, 9))
    rank = int(rng.integers(1, t))
    assert (p, t, rank) == ((836, 7, 1) if seed == 5 else (781, 7, 1))
    J = rng.standard_normal((t, rank)) @ rng.standard_normal((rank, p))
    J *= 10.0 ** rng.uniform(-2, 2, size=(t, 1))
    unit_rows = J / np.linalg.norm(J, axis=1, keepdims=True)
    g = rng.standard_normal(p) - unit_rows.sum(axis=0) * rng.uniform(0, 3)
    problem = Problem(torch.tensor(g), torch.tensor(J))
    x = gem_project(problem.g, problem.J)
    assert_is_the_projection(problem, x)
    assert float(x.norm()) <= float(problem.g.norm())


@given(dependent_problems())
def test_every_solver_is_certified_on_dependent_constraints(problem):
    # OSQP and Clarabel may give no answer on such problems; DAQP then takes over
    for solver in ("enumerate", "daqp", "osqp", "clarabel"):
        if solver == "enumerate" and problem.t > qp.MAX_ENUMERATE:
            continue
        solution = gem_multipliers(stacked_gram(problem), solver=solver)
        assert float(solution.kkt_residual) <= qp.KKT_TOLERANCE
        assert_is_the_projection(problem, problem.g + problem.J.T @ solution.v)


@given(dependent_problems())
def test_the_brute_force_reference_is_feasible_and_no_farther_than_nnls(problem):
    # SciPy's NNLS is not exact on rank-deficient rows (see tests/reference.py): when its
    # answer is feasible it must not be closer to g than the brute force's
    g, J = problem.g.numpy(), problem.J.numpy()
    brute, nnls = reference.project_brute(g, J), reference.solve_dual(g, J)
    g_norm, row_norms = np.linalg.norm(g), np.linalg.norm(J, axis=1)
    assert np.all(J @ brute >= -FEASIBILITY * g_norm * row_norms)
    if np.all(J @ nnls >= -FEASIBILITY * g_norm * row_norms):
        assert np.linalg.norm(brute - g) <= np.linalg.norm(nnls - g) + RTOL * g_norm


def uncertifiable(problem: qp._Scaled) -> tuple[torch.Tensor, torch.Tensor]:
    """Stands in for a device solver that returns a wrong point (every multiplier at 0)."""
    return problem.lower, qp._certificate(problem, problem.lower)


def uncertifiable_on_host(problem: qp_host.Problem) -> tuple[np.ndarray, float]:
    """The same, for the host path (float64 CPU tensors)."""
    return problem.lower, float(qp_host.certificate(problem, problem.lower))


def make_enumeration_uncertifiable(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make ``"enumerate"`` return a wrong point on ``path`` (the device path runs on CPU)."""
    if path == "device":
        monkeypatch.setattr(sync, "host_reads_are_free", lambda device: False)
        monkeypatch.setattr(qp, "_enumerate", uncertifiable)
    else:
        monkeypatch.setattr(qp_host, "enumerate_candidates", uncertifiable_on_host)


def issue_step(g: torch.Tensor, J: torch.Tensor) -> tuple[torch.nn.Linear, GEMProjector]:
    """A GEMProjector (margin 0) on one weight holding the issue's task and memory rows."""
    model = torch.nn.Linear(2, 1, bias=False).double()
    opt = GEMProjector(torch.optim.SGD(model.parameters(), lr=1.0), 0.0, constraints=5)
    (model.weight * g).sum().backward()
    for k in range(5):
        with opt.constraint(k):
            (model.weight * J[k]).sum().backward()
    return model, opt


@pytest.mark.parametrize("path", ["host", "device"])
def test_an_uncertified_device_answer_falls_back_to_the_exact_solver(monkeypatch, path):
    make_enumeration_uncertifiable(monkeypatch, path)
    g = torch.tensor(ISSUE_G, dtype=torch.float64)
    J = torch.tensor(ISSUE_J, dtype=torch.float64)
    assert float(gem_project(g, J, validate=False).norm()) > 1  # the bad answer, unchecked
    x = gem_project(g, J)
    assert float(x.norm()) <= 1e-12

    model, opt = issue_step(g, J)
    before = model.weight.detach().clone()
    opt.step()
    assert bool(opt.last_stats.fallback)
    assert opt.last_stats.to_dict()["gem/fallback"] == 1.0
    assert torch.allclose(model.weight, before, rtol=0, atol=1e-12)


def test_a_certified_step_reports_no_fallback():
    model = torch.nn.Linear(3, 1, bias=False).double()
    opt = GEMProjector(torch.optim.SGD(model.parameters(), lr=1.0), 0.0, constraints=2)
    (model.weight * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    for k, row in enumerate([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]):
        with opt.constraint(k):
            (model.weight * torch.tensor(row)).sum().backward()
    opt.step()
    assert bool(opt.last_stats.projected)
    assert not bool(opt.last_stats.fallback)


@pytest.mark.parametrize("path", ["host", "device"])
def test_when_even_the_exact_solver_fails_nothing_changes(monkeypatch, path):
    make_enumeration_uncertifiable(monkeypatch, path)
    monkeypatch.setattr(qp_host, "backend_solution", lambda problem, solver: problem.lower)
    g = torch.tensor(ISSUE_G, dtype=torch.float64)
    J = torch.tensor(ISSUE_J, dtype=torch.float64)
    with pytest.raises(SolverError, match=FALLBACK_SOLVER):
        gem_project(g, J)

    model, opt = issue_step(g, J)
    before = model.weight.detach().clone()
    with pytest.raises(SolverError, match="nothing was changed"):
        opt.step()
    assert torch.equal(model.weight, before)
    assert torch.equal(model.weight.grad, g[None])


def integer_batch(rng: np.random.Generator, n: int, t: int, p: int) -> tuple[np.ndarray, ...]:
    J = rng.integers(-3, 4, size=(n, t, p)).astype(np.float64)
    g = rng.integers(-5, 6, size=(n, p)).astype(np.float64)
    return g, J


def projection_failures(g: np.ndarray, J: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which ``x = g + Jᵀv`` (batched) are not the projection of ``g``, checked directly.

    ``x`` is the projection onto ``C = {Jx ≥ 0}`` iff ``x ∈ C``, ``g − x = −Jᵀv`` lies in
    the polar cone (``v ≥ 0``) and ``⟨x, x − g⟩ = 0``; checked to 1e-9 of ``‖g‖ ‖g_k‖``.
    """
    x = g + np.einsum("ntp,nt->np", J, v)
    g_norm, row_norms = np.linalg.norm(g, axis=1), np.linalg.norm(J, axis=2)
    dots = np.einsum("ntp,np->nt", J, x)
    feasible = np.all(dots >= -FEASIBILITY * g_norm[:, None] * row_norms, axis=1)
    term_scale = g_norm + (np.abs(v) * row_norms).sum(axis=1)
    orthogonal = np.abs(np.einsum("np,np->n", x, x - g)) <= FEASIBILITY * g_norm * term_scale
    bounded = np.linalg.norm(x, axis=1) <= g_norm * (1 + FEASIBILITY)
    return ~(feasible & orthogonal & bounded & np.all(v >= 0, axis=1))


@pytest.mark.slow
def test_search_of_small_integer_problems_finds_no_failure():
    # 105,000 problems in 2-4 dimensions with 2-8 rows of entries in [-3, 3], batched
    # through the device path (enumeration alone, no fallback). 12-25 s on one shared core.
    solve = torch.vmap(gem_multipliers)
    rng = np.random.default_rng(12)
    failures, searched, started = 0, 0, time.perf_counter()
    for p in (2, 3, 4):
        for t in range(2, qp.MAX_ENUMERATE + 1):
            g, J = integer_batch(rng, 5000, t, p)
            rows = torch.cat([torch.tensor(g)[:, None], torch.tensor(J)], dim=1)
            solution = solve(rows @ rows.transpose(1, 2))
            assert float(solution.kkt_residual.max()) <= qp.KKT_TOLERANCE
            failures += int(projection_failures(g, J, solution.v.numpy()).sum())
            searched += len(g)
    assert searched >= 100_000
    assert failures == 0, (
        f"{failures} of {searched} problems ({time.perf_counter() - started:.0f} s)"
    )


def test_a_host_backend_without_an_answer_gets_a_nearby_convex_problem():
    # quadprog needs K positive definite: duplicated rows make it refuse the problem itself
    problem = Problem(
        torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
        torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64),
    )
    K = (problem.J @ problem.J.T).numpy()
    with pytest.raises(SolverError, match="quadprog"):
        qp.backend_solve("quadprog", K, (problem.J @ problem.g).numpy(), lb=np.zeros(3))
    solution = gem_multipliers(stacked_gram(problem), solver="quadprog")
    assert float(solution.kkt_residual) <= qp.KKT_TOLERANCE
    assert_is_the_projection(problem, problem.g + problem.J.T @ solution.v)

"""The host path (NumPy, for float64 CPU tensors) against the device path, on the same problems.

The device path is the torch code an accelerator runs; it runs here on CPU tensors with
``gradsurgery.sync.host_reads_are_free`` answering False, as ``tests/sync_guard.py`` does.
Both must accept and reject alike, and give the same multipliers where they are unique
(the same projection ``x = g + Jᵀv`` where they are not: dependent constraints).
"""

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery import GEMProjector, qp, qp_host, sync
from gradsurgery import gram as gram_module
from gradsurgery.errors import NonFiniteGradientError, SolverError
from gradsurgery.functional import gem_multipliers, gem_project
from gradsurgery.functional.gem import check_solution
from tests.strategies import Problem, dependent_problems, problems

# Rounding differences between the paths, relative to the size of the terms summed.
RTOL = 1e-9


@contextmanager
def device_path() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sync, "host_reads_are_free", lambda device: False)
        yield


def both_paths(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """``fn`` on the host path and on the device path, both with PyTorch's Gram.

    The device path never takes the compiled kernels; without them on the host too, only
    the solve differs (ill-conditioned duals amplify the Grams' last-bit differences).
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADSURGERY_KERNELS", "0")
        host = fn()
    with device_path():
        device = fn()
    return host, device


def stacked_gram(problem: Problem) -> torch.Tensor:
    return gram_module.gram(torch.cat([problem.g[None], problem.J]))


def unique_minimiser(K: np.ndarray) -> bool:
    """Whether the dual's minimiser is unique and well conditioned (``K`` far from singular)."""
    d = np.sqrt(np.clip(np.diag(K), 1e-300, None))
    eigenvalues = np.linalg.eigvalsh(K / np.outer(d, d))
    return bool(eigenvalues[0] > 1e-6 * eigenvalues[-1])


def assert_same_multipliers(problem: Problem, host: torch.Tensor, device: torch.Tensor) -> None:
    """Equal where unique; else the same ``x = g + Jᵀv`` to rounding of its terms."""
    g, J = problem.g.numpy(), problem.J.numpy()
    v_host, v_device = host.numpy(), device.numpy()
    norms = np.linalg.norm(J, axis=1)
    terms = np.linalg.norm(g) + np.sum((np.abs(v_host) + np.abs(v_device)) * norms)
    difference = (g + J.T @ v_host) - (g + J.T @ v_device)
    assert np.linalg.norm(difference) <= RTOL * terms
    if unique_minimiser(J @ J.T):
        assert np.allclose(v_host, v_device, rtol=1e-6, atol=1e-6 * np.abs(v_device).max())


def nasty_problems() -> st.SearchStrategy[Problem]:
    return st.one_of(problems(), dependent_problems())


@given(nasty_problems(), st.sampled_from([0.0, 0.5]), st.sampled_from(["gem", "agem"]))
def test_gem_multipliers_agree_with_the_device_path(problem, margin, mode):
    gram = stacked_gram(problem)
    host, device = both_paths(lambda: gem_multipliers(gram, margin, mode=mode))
    assert bool(host.violated) == bool(device.violated)
    assert not bool(host.fallback) and not bool(device.fallback)
    tolerance = qp.kkt_tolerance(problem.t, [torch.float64])
    assert (float(host.kkt_residual) <= tolerance) == (float(device.kkt_residual) <= tolerance)
    assert host.v.dtype == device.v.dtype == torch.float64
    assert host.kkt_residual.dtype == device.kkt_residual.dtype
    assert host.violated.dtype == device.violated.dtype == torch.bool
    assert_same_multipliers(problem, host.v, device.v)


@pytest.mark.parametrize("solver", ["enumerate", "daqp"])
@given(problem=nasty_problems(), margin=st.sampled_from([0.0, 0.3]))
def test_every_solver_agrees_with_the_device_path(solver, problem, margin):
    if solver == "enumerate" and problem.t > qp.MAX_ENUMERATE:
        return
    J, g = problem.J, problem.g
    K, b = J @ J.T, J @ g
    lower = torch.full((problem.t,), margin, dtype=torch.float64)
    unit = g.norm()
    host, device = both_paths(lambda: qp.solve_lower_bounded(K, b, lower, solver, unit))
    residuals = [float(solution.kkt_residual) / qp.KKT_TOLERANCE for solution in (host, device)]
    if all(abs(residual - 1) > 0.05 for residual in residuals):  # rounding decides at the edge
        assert (residuals[0] <= 1) == (residuals[1] <= 1)
    assert torch.all(host.v >= lower)
    assert_same_multipliers(problem, host.v, device.v)


def test_the_enumeration_gives_the_same_candidates_on_both_paths():
    # the same 2^t linear systems, solved by the same LAPACK call: the same best candidate
    rng = np.random.default_rng(4)
    J = rng.standard_normal((6, 20))
    g = rng.standard_normal(20) - J.sum(axis=0)
    K, b = torch.tensor(J @ J.T), torch.tensor(J @ g)
    lower = torch.full((6,), 0.5, dtype=torch.float64)
    device_u, device_certificate = qp._enumerate(qp._scale(K, b, lower))
    host = qp_host.scale(K.numpy(), b.numpy(), lower.numpy())
    host_u, host_certificate = qp_host.enumerate_candidates(host)
    assert np.allclose(host_u, device_u.numpy(), rtol=1e-12, atol=0)
    assert host_certificate <= 1e-12 and float(device_certificate) <= 1e-12


@given(
    k=st.floats(0, 1e30) | st.sampled_from([0.0, 5e-324, 1e-300]),
    beta=st.floats(-1e30, 1e30),
    low=st.sampled_from([0.0, 0.5, 3.0]),
    unit=st.none() | st.floats(1e-30, 1e30),
)
def test_the_one_variable_shortcut_is_the_array_code(k, beta, low, unit):
    with np.errstate(all="ignore"):
        arrays = qp_host.solve_arrays(
            np.array([[k]]), np.array([beta]), np.array([low]), "closed_form", unit
        )
    scalar = qp_host.closed_form(k, beta, low, unit)
    if scalar is None:  # only where the arrays overflow or underflow: they then run
        assert not np.all(np.isfinite([*arrays[0], arrays[1]])) or k < 1e-300
        return
    assert scalar[0] == arrays[0][0]
    assert scalar[1] == arrays[1]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["task", "constraint"])
@pytest.mark.parametrize("mode", ["gem", "agem"])
def test_non_finite_grams_are_reported_alike_and_without_warnings(bad, where, mode):
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    J = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    (g if where == "task" else J[1])[0] = bad
    gram = stacked_gram(Problem(g, J))

    def check() -> bool:
        solution = gem_multipliers(gram, 0.5, mode=mode)
        checked = check_solution(
            gram,
            solution,
            0.5,
            mode=mode,
            solver="auto",
            eps=0.0,
            exact_gram=lambda: gram,
            n=3,
            dtypes=[torch.float64],
            validate=True,
        )
        return checked.finite

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert both_paths(check) == (False, False)
        with pytest.raises(NonFiniteGradientError):
            gem_project(g, J)


@given(
    nasty_problems(),
    st.sampled_from([torch.float64, torch.float32]),
    st.sampled_from([1e-30, 1.0, 1e15]),
    st.sampled_from(["gem", "agem"]),
)
def test_a_wrapper_step_is_the_same_on_both_paths(problem, dtype, scale, mode):
    # fp32 rows are rounded Grams (near-dependent ones re-solved from the float64 Gram or by
    # the fallback); 1e-30 underflows fp32 squares (the Gram is recomputed), 1e15 does not
    g, J = (problem.g * scale).to(dtype), (problem.J * scale).to(dtype)

    def step() -> tuple[torch.Tensor, bool] | type[Exception]:
        weight = torch.nn.Parameter(torch.zeros_like(g))
        opt = GEMProjector(torch.optim.SGD([weight], lr=1.0), 0.0, constraints=len(J), mode=mode)
        weight.grad = g.clone()
        for k in range(len(J)):
            with opt.constraint(k):
                (weight * J[k]).sum().backward()
        try:
            opt.step()
        except (SolverError, NonFiniteGradientError) as error:
            assert torch.equal(weight.grad, g)  # nothing changed
            return type(error)
        assert opt.last_stats is not None
        return -weight.detach().double(), bool(opt.last_stats.fallback)

    host, device = both_paths(step)
    if not isinstance(host, tuple) or not isinstance(device, tuple):
        assert host == device
        return
    assert host[1] == device[1]  # the same fallback
    unit = problem.g.norm() * scale
    multipliers = gem_multipliers(stacked_gram(problem), mode=mode).v
    terms = float(unit + (multipliers.abs() * problem.J.norm(dim=1) * scale).sum())
    rtol = RTOL if dtype == torch.float64 else 1e-6
    assert float((host[0] - device[0]).norm()) <= rtol * terms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_near_opposite_constraints_are_projected_alike(dtype, margin):
    # J₁ = −3·J₀ to a relative 1e-6 (multipliers of ~1e4-1e6): the multipliers of the two
    # paths may differ by rounding times the conditioning, the projection may not
    for seed in range(16):
        rng = np.random.default_rng(seed)
        p = int(rng.choice([10, 100, 1000]))
        J = rng.standard_normal((int(rng.integers(2, 5)), p))
        J[1] = -3 * J[0] + 1e-6 * np.linalg.norm(J[0]) * rng.standard_normal(p) / np.sqrt(p)
        g = rng.standard_normal(p) - 2 * J[0] / np.linalg.norm(J[0]) * np.sqrt(p)
        g_t, J_t = torch.tensor(g, dtype=dtype), torch.tensor(J, dtype=dtype)
        host, device = both_paths(lambda: gem_project(g_t, J_t, margin))  # noqa: B023
        v = gem_multipliers(stacked_gram(Problem(g_t.double(), J_t.double())), margin).v
        terms = float(g_t.double().norm() + (v.abs() * J_t.double().norm(dim=1)).sum())
        rtol = RTOL if dtype == torch.float64 else 1e-6
        assert float((host.double() - device.double()).norm()) <= rtol * terms


def test_only_float64_cpu_tensors_that_hold_memory_are_solved_on_the_host():
    K = torch.eye(2, dtype=torch.float64)
    assert qp.on_host(K)
    assert not qp.on_host(K.float())
    with torch.no_grad():
        assert qp.on_host(K.clone().requires_grad_())
    assert not qp.on_host(K.clone().requires_grad_())
    with device_path():
        assert not qp.on_host(torch.eye(2, dtype=torch.float64))
    seen = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(qp.on_host(x))
        return x

    torch.vmap(record)(torch.ones(3, 2, dtype=torch.float64))
    assert seen == [False]


def test_vmap_takes_the_device_path():
    rng = np.random.default_rng(0)
    rows = torch.tensor(rng.standard_normal((6, 4, 5)))
    rows[:, 0] -= 2 * rows[:, 1:].sum(dim=1)
    grams = rows @ rows.transpose(1, 2)
    batched = torch.vmap(gem_multipliers)(grams)
    for i in range(len(grams)):
        single = gem_multipliers(grams[i])
        assert torch.allclose(batched.v[i], single.v, rtol=1e-9, atol=1e-12)
        assert bool(batched.violated[i]) == bool(single.violated)


@pytest.mark.parametrize("violated", [True, False])
def test_a_bad_solver_is_refused_alike_whether_or_not_a_constraint_is_violated(violated):
    g = torch.tensor([1.0, -2.0 if violated else 2.0, 0.5], dtype=torch.float64)
    J = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    gram = stacked_gram(Problem(g, J))
    for path in (nullcontext(), device_path()):
        with path, pytest.raises(ValueError, match="exactly one constraint"):
            gem_multipliers(gram, solver="closed_form")


@pytest.mark.parametrize("t", [3, 7])
def test_an_exactly_singular_system_is_recognised_on_the_host(t):
    # NumPy refuses the whole batch for one singular system (t = 3); torch says which
    A = np.stack([np.eye(t), np.ones((t, t)), 2 * np.eye(t)])
    rhs = np.ones((3, t))
    u, regular = qp_host._solve_systems(A, rhs)
    assert regular is not None and regular.tolist() == [True, False, True]
    assert np.allclose(u[[0, 2]], [np.ones(t), np.full(t, 0.5)])
    u, regular = qp_host._solve_systems(A[[0, 2]], rhs[:2])
    assert np.allclose(u, [np.ones(t), np.full(t, 0.5)])
    assert regular is None or regular.all()

r"""The solvers of :mod:`gradsurgery.qp`, in NumPy float64, for problems already on the host.

A GEM step's dual has ``t ≤ 8`` variables for ``"auto"``: solving it is a fixed number of
operations on arrays of at most ``2^t × t`` numbers, whatever the model size. With torch
tensors each of those operations costs a dispatch of about a microsecond (more than the
arithmetic), which is worth paying on an accelerator, where it keeps the step free of
host synchronisation. On the CPU the values are already on the host, and the same
algorithm on NumPy arrays costs a fraction of it. This module is that algorithm:

* :func:`scale`, :func:`certificate`, :func:`unit_ratio`: the rescaling and the
  certificate of :func:`gradsurgery.qp.kkt_residual`, term by term;
* :func:`enumerate_candidates`: the ``2^t`` candidates of the ``"enumerate"`` solver, whose
  linear systems are solved by LU with partial pivoting as on the device (an exactly
  singular one is recognised alike), and the candidate the certificate trusts most;
* :func:`backend_solution`: a qpsolvers backend finished by Lawson–Hanson active-set steps
  (the host solvers of either path);
* :func:`solve`: :func:`gradsurgery.qp.solve_lower_bounded` on arrays.

Rounding aside, the results are those of the device path (tested on the same problems).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from gradsurgery.errors import SolverError

__all__ = [
    "Problem",
    "backend_solution",
    "backend_solve",
    "certificate",
    "closed_form",
    "enumerate_candidates",
    "scale",
    "solve",
    "solve_arrays",
    "solve_quietly",
    "unit_ratio",
]

_KKT_TOL = 1e-9
_NUMPY_SOLVE_MAX = 5
_EPS = float(np.finfo(np.float64).eps)
# Interior-point and ADMM backends stop early at their default tolerances (OSQP off by up
# to 6 %, Clarabel by 5e-6 relative on GEM duals); these settings make them exact to 1e-8.
_BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "osqp": {"eps_abs": 1e-10, "eps_rel": 1e-10, "polish": True, "max_iter": 100_000},
    "clarabel": {
        "tol_gap_abs": 1e-12,
        "tol_gap_rel": 1e-12,
        "tol_feas": 1e-12,
        "tol_ktratio": 1e-10,
    },
}


class Problem(NamedTuple):
    """The problem in ``u = s ⊙ v``: unit diagonal, ``max |b| = 1`` (float64 arrays)."""

    K: np.ndarray
    b: np.ndarray
    lower: np.ndarray
    s: np.ndarray


class _Subsets(NamedTuple):
    negated_free: np.ndarray  # (2^t, t): -1 where the variable is free (solved for), else 0
    fixed: np.ndarray  # (2^t, t): 1 where the variable is at its bound, else 0
    pairs: np.ndarray  # (2^t, t, t): free ⊗ free
    identity: np.ndarray  # (2^t, t, t): diag(fixed)


@functools.lru_cache(maxsize=16)
def _subsets(t: int) -> _Subsets:
    codes = np.arange(2**t)[:, None]
    free = ((codes & (1 << np.arange(t))) != 0).astype(np.float64)
    fixed = 1 - free
    identity = fixed[:, :, None] * np.eye(t)
    subsets = _Subsets(-free, fixed, free[:, :, None] * free[:, None, :], identity)
    for array in subsets:  # shared by every later call
        array.flags.writeable = False
    return subsets


def _unit_diagonal_scale(K: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.maximum(K.diagonal(), 0.0))
    return np.where(d > 0, d, 1.0)


def _scaled(K: np.ndarray, b: np.ndarray, lower: np.ndarray) -> tuple[Problem, float]:
    """The rescaled problem and ``max_k |b_k| / sqrt(K_kk)`` (which it divides ``b`` by)."""
    d = _unit_diagonal_scale(K)
    bn = b / d
    largest = float(np.abs(bn).max())
    divisor = largest if largest > 0 else 1.0
    s = d / divisor
    return Problem(K / np.multiply.outer(d, d), bn / divisor, lower * s, s), largest


def scale(K: np.ndarray, b: np.ndarray, lower: np.ndarray) -> Problem:
    """Rescale to a unit diagonal and ``max |b| = 1`` (a zero row keeps a unit scale)."""
    return _scaled(K, b, lower)[0]


def certificate(problem: Problem, u: np.ndarray) -> np.ndarray:
    """The certificate of :func:`gradsurgery.qp.kkt_residual` for candidates ``(..., t)``."""
    K, b, lower = problem.K, problem.b, problem.lower
    r = u @ K.T
    r += b
    rounding = np.abs(u) @ np.abs(K).T
    rounding += np.abs(b)
    rounding *= (K.shape[0] + 4) * _EPS
    slack = u - lower
    worst = np.maximum(-slack, rounding - r)
    complementarity = np.abs(r)
    complementarity -= rounding
    np.minimum(slack, complementarity, out=complementarity)
    np.maximum(worst, complementarity, out=worst)
    largest: np.ndarray = np.maximum(worst.max(axis=-1), 0.0)
    return largest


def unit_ratio(K: np.ndarray, b: np.ndarray, unit: float | None) -> float:
    """``max_k |b_k| / sqrt(K_kk)`` over ``unit`` (at most 1): the certificate's change of unit."""
    return _ratio(float(np.abs(b / _unit_diagonal_scale(K)).max()), unit)


def _ratio(largest: float, unit: float | None) -> float:
    return largest / unit if unit is not None and unit > largest else 1.0


def _solve_systems(A: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Solve ``A[i] u[i] = rhs[i]`` by LU with partial pivoting (LAPACK's ``getrf``/``getrs``).

    Also returns which systems were regular (``None``: all of them); an exactly singular
    one (a zero pivot) has no meaningful solution. NumPy's batched solve costs less for up
    to ``_NUMPY_SOLVE_MAX`` variables (measured 3 µs against torch's 11 µs for ``t = 2``),
    ``torch.linalg.solve_ex``, which the device path calls, beyond (73 µs against 96 µs for
    ``t = 8``) and wherever NumPy finds a singular system (it cannot say which).
    """
    if A.shape[-1] <= _NUMPY_SOLVE_MAX:
        try:
            return np.linalg.solve(A, rhs[..., None])[..., 0], None
        except np.linalg.LinAlgError:
            pass
    solved, info = torch.linalg.solve_ex(torch.from_numpy(A), torch.from_numpy(rhs))
    return solved.numpy(), info.numpy() == 0


def enumerate_candidates(problem: Problem) -> tuple[np.ndarray, float]:
    """The candidate the certificate trusts most among the ``2^t``, and its certificate."""
    K, b, lower = problem.K, problem.b, problem.lower
    subsets = _subsets(K.shape[0])
    A = K * subsets.pairs
    A += subsets.identity
    pinned = subsets.fixed * lower
    rhs = pinned @ K
    rhs += b
    rhs *= subsets.negated_free
    rhs += pinned
    u, regular = _solve_systems(A, rhs)
    valid = np.isfinite(u)
    if regular is not None:
        valid &= regular[:, None]
    u = np.where(valid, u, lower)
    np.maximum(u, lower, out=u)
    certificates = certificate(problem, u)
    best = int(np.argmin(certificates))
    return u[best], float(certificates[best])


def backend_solution(problem: Problem, solver: str) -> np.ndarray:
    """``u`` from a qpsolvers backend, finished exactly by :func:`_refine`.

    A backend that gives no answer (an fp32-accumulated ``K`` of dependent rows is
    indefinite by its rounding) is given the nearby convex problem of :func:`_nearby_convex`,
    and if it fails on that too, the active-set steps start from the bounds.
    """
    # A zero constraint row (an objective that reaches no parameter) has nothing to solve
    # for: its multiplier stays at its bound. Backends that need K nonsingular fail on it.
    live = problem.K.diagonal() > 0
    u = problem.lower.copy()
    if live.any():
        P = problem.K[np.ix_(live, live)]
        q, lb = problem.b[live], problem.lower[live]
        try:
            x = backend_solve(solver, P, q, lb=lb)
        except SolverError:
            try:
                x = backend_solve(solver, _nearby_convex(P), q, lb=lb)
            except SolverError:
                x = lb  # the active-set steps below then solve it from the bounds
        u[live] = x
    return _refine(problem, np.maximum(u, problem.lower))


def _nearby_convex(P: np.ndarray) -> np.ndarray:
    r"""``P + δI``, positive definite, with ``δ`` of the size of the Gram's rounding.

    A Gram matrix accumulated in fp32 from dependent rows (more constraints than
    dimensions, near-opposite rows) is indefinite by its rounding: eigenvalues down to
    about :math:`-t\,\varepsilon_{32}` on the unit diagonal. Along such a direction the
    dual is unbounded below and backends give no answer. The shifted problem is a
    nearby one (a perturbation no larger than the rounding already in ``P``); its
    solution is then finished and certified against the original ``P``.
    """
    t = len(P)
    lowest = float(np.linalg.eigvalsh(P)[0])
    shift = 2 * max(-lowest, 0.0) + (t + 4) * _EPS
    shifted: np.ndarray = P + shift * np.eye(t)
    return shifted


def backend_solve(
    solver: str, P: np.ndarray, q: np.ndarray, **constraints: np.ndarray
) -> np.ndarray:
    """Run ``qpsolvers.solve_qp(P, q, **constraints)`` with this project's tolerances.

    Warnings are silenced and a missing answer raises :class:`SolverError`: every problem
    solved here is feasible, so a missing answer is numerical.
    """
    import qpsolvers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qpsolvers warns about dense-to-sparse conversions
        try:
            x = qpsolvers.solve_qp(
                P,
                q,
                solver=solver,
                verbose=False,
                **constraints,
                **_BACKEND_OPTIONS.get(solver, {}),
            )
        except Exception as error:  # backends raise their own exception types
            raise SolverError(f"qpsolvers backend {solver!r} failed: {error}") from error
    if x is None or not np.all(np.isfinite(x)):
        raise SolverError(
            f"qpsolvers backend {solver!r} returned no solution ({len(q)} variables); the "
            "problem is always feasible, so this is numerical: try another solver"
        )
    return np.asarray(x, dtype=np.float64)


def _refine(problem: Problem, u: np.ndarray) -> np.ndarray:
    """Finish a backend's solution exactly with Lawson–Hanson active-set steps.

    Backends stop at their tolerances, and on degenerate problems (a singular ``K`` from
    duplicate constraints or more constraints than parameters) DAQP alone was measured up
    to 2e-5 off. Starting from the backend's free set, the loop below (the active-set
    method of Lawson & Hanson's NNLS, on ``y = u − ℓ ≥ 0`` in Gram form, with least squares
    for singular subsystems) ends at an exact KKT point; from a good start it ends at once.
    The result replaces ``u`` only if its KKT residual is no larger.
    """
    K, lower = problem.K, problem.lower
    q = problem.b + K @ lower
    y = np.maximum(u - lower, 0.0)
    passive = y > _KKT_TOL * (1 + y.max())
    y = _towards_passive_optimum(K, q, passive, np.where(passive, y, 0.0))
    seen = set()  # passive sets whose optimum was reached
    for _ in range(3 * len(q) + 10):
        gradient = K @ y + q
        gradient[passive] = np.inf
        j = int(np.argmin(gradient))
        if gradient[j] >= -_KKT_TOL * (1 + np.abs(y).max()):
            break
        if passive.tobytes() in seen:
            break  # the same optimum again: a cycle (singular K); the certificate decides
        seen.add(passive.tobytes())
        passive[j] = True
        y = _towards_passive_optimum(K, q, passive, y)
    refined = y + lower
    return refined if certificate(problem, refined) <= certificate(problem, u) else u


def _towards_passive_optimum(
    K: np.ndarray, q: np.ndarray, passive: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Lawson–Hanson inner loop: move from feasible ``y`` to the optimum on the passive set.

    Solves the stationarity equations of the passive variables (the others at 0); if that
    point is infeasible, steps towards it until a passive variable reaches 0, drops it, and
    repeats. ``passive`` is updated in place.
    """
    for _ in range(len(q) + 1):
        index = np.flatnonzero(passive)
        if index.size == 0:
            return np.zeros_like(y)
        z = np.zeros_like(y)
        z[index] = np.linalg.lstsq(K[np.ix_(index, index)], -q[index], rcond=None)[0]
        if np.all(z[index] > 0):
            return z
        blocking = index[z[index] <= 0]
        alpha = np.min(y[blocking] / (y[blocking] - z[blocking]))
        y = y + alpha * (z - y)
        passive &= y > _KKT_TOL * (1 + np.abs(y).max())
        y[~passive] = 0.0
    return y


def solve(
    K: np.ndarray, b: np.ndarray, lower: np.ndarray, solver: str, unit: float | None = None
) -> tuple[np.ndarray, float]:
    """:func:`gradsurgery.qp.solve_lower_bounded` on float64 arrays, for a resolved solver.

    Returns the minimiser ``v`` and its certificate (relative to ``unit``). Arithmetic on
    non-finite input gives non-finite output, without warnings (callers report it).
    """
    with np.errstate(all="ignore"):
        return solve_quietly(K, b, lower, solver, unit)


def solve_quietly(
    K: np.ndarray, b: np.ndarray, lower: np.ndarray, solver: str, unit: float | None = None
) -> tuple[np.ndarray, float]:
    """:func:`solve` for callers that silenced NumPy's floating-point warnings already."""
    if solver == "closed_form":
        one = closed_form(float(K[0, 0]), float(b[0]), float(lower[0]), unit)
        if one is not None:
            return np.array([one[0]]), one[1]
    return solve_arrays(K, b, lower, solver, unit)


def solve_arrays(
    K: np.ndarray, b: np.ndarray, lower: np.ndarray, solver: str, unit: float | None = None
) -> tuple[np.ndarray, float]:
    """:func:`solve_quietly` without the shortcut of :func:`closed_form` for one variable."""
    problem, largest = _scaled(K, b, lower)
    if solver == "enumerate":
        u, residual = enumerate_candidates(problem)
    else:
        if solver == "closed_form":
            u = np.maximum(problem.lower, -problem.b)
        else:
            u = backend_solution(problem, solver)
        residual = float(certificate(problem, u))
    v = u / problem.s
    np.maximum(v, lower, out=v)  # undo the rescaling without rounding below a bound
    return v, residual * _ratio(largest, unit)


def closed_form(
    k: float, beta: float, low: float, unit: float | None
) -> tuple[float, float] | None:
    """``"closed_form"`` for one variable in Python floats: ``(v, certificate)``, or ``None``.

    :func:`solve_arrays` for ``K = [[k]]``, ``b = [beta]``, ``lower = [low]``, without
    arrays to set up (most of its cost for one variable).

    The same operations in the same order, so the same roundings. ``None`` where a number
    is not finite (Python's ``max`` orders NaNs differently from NumPy's) or a divisor
    underflows to 0 (Python raises where NumPy divides): the array code then runs.
    """
    if not (math.isfinite(k) and math.isfinite(beta) and math.isfinite(low)):
        return None
    d = math.sqrt(k) if k > 0 else 1.0
    bn = beta / d
    largest = abs(bn)
    divisor = largest if largest > 0 else 1.0
    s = d / divisor
    if d * d == 0 or s == 0:  # underflow: Python raises where NumPy gives Inf
        return None
    kn, bs, ls = k / (d * d), bn / divisor, low * s
    u = max(ls, -bs)
    r = u * kn + bs
    rounding = (abs(u) * abs(kn) + abs(bs)) * (5 * _EPS)
    slack = u - ls
    residual = max(-slack, rounding - r, min(slack, abs(r) - rounding), 0.0)
    v = max(u / s, low)
    if not all(map(math.isfinite, (kn, bs, ls, u, r, rounding, v, residual))):
        return None
    return v, residual * _ratio(largest, unit)

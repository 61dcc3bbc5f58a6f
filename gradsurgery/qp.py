r"""Small quadratic programs with lower bounds, solved exactly.

:func:`solve_lower_bounded` solves

.. math::

    \min_v \tfrac12 v^\top K v + b^\top v \quad \text{s.t.} \quad v \ge \ell

for a positive semi-definite ``K`` of size ``t × t``: the dual of a projection onto a
polyhedral cone (GEM). Solvers:

``"closed_form"``
    ``t = 1`` only: ``v = max(ℓ, −b/K)``.
``"enumerate"``
    Exact, on the tensors' device, without host synchronisation: every one of the
    :math:`2^t` choices of free variables gives a linear system; the answer is the
    candidate with the best certificate (:func:`kkt_residual`), which no candidate with
    huge multipliers from a singular system can pass. All candidates are solved in one
    batched call, so the cost is a fixed number of kernel launches whatever the data.
    ``"auto"`` picks it for ``2 ≤ t ≤ MAX_ENUMERATE``.
any qpsolvers backend (``"daqp"``, ``"quadprog"``, ``"osqp"``, ``"clarabel"``, ...)
    On the CPU in float64 (for accelerator tensors, one device-to-host copy of ``t² + t``
    numbers), then finished exactly by active-set (Lawson–Hanson) steps started from the
    backend's solution (or from the bounds, where the backend gave none).
    ``"daqp"``, which ``"auto"`` picks for ``t > MAX_ENUMERATE``, is exact
    and accepts a singular ``K``; ``"quadprog"`` needs ``K`` positive definite; ``"osqp"``
    and ``"clarabel"`` run with tightened tolerances. See ``docs/solvers.md`` for the measured
    accuracy and time of each.

Before solving, the problem is rescaled to a unit diagonal and ``max |b| = 1`` (a zero row
keeps a unit scale). The solution is invariant to that rescaling, and the solvers'
absolute tolerances then mean the same thing whether gradients are of size 1e-6 or 1e3.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradsurgery.errors import SolverError

__all__ = [
    "KKT_TOLERANCE",
    "MAX_ENUMERATE",
    "QPSolution",
    "backend_solve",
    "is_host_solver",
    "kkt_residual",
    "kkt_tolerance",
    "resolve_solver",
    "solve_lower_bounded",
]

MAX_ENUMERATE = 8
KKT_TOLERANCE = 1e-6
"""The largest relative KKT residual a step accepts before raising :class:`SolverError`,
where the Gram matrix is exact enough for it (see :func:`kkt_tolerance`)."""


def kkt_tolerance(t: int, gradient_dtypes: Iterable[torch.dtype]) -> float:
    """The KKT residual a solve of ``t`` variables must reach, given the gradients' dtypes.

    ``KKT_TOLERANCE``, unless the Gram matrix is too coarse for it: it is accumulated in
    fp32 for fp32/fp16/bf16 gradients, and its rounding alone moves the residual by up to
    about ``t·ε`` (measured 1.6e-6 for five constraints in three dimensions, where the
    rounded Gram is indefinite). The bound is then ``8·t·ε``.
    """
    dtypes = list(gradient_dtypes)
    exact = bool(dtypes) and all(dtype == torch.float64 for dtype in dtypes)
    eps = torch.finfo(torch.float64 if exact else torch.float32).eps
    return max(KKT_TOLERANCE, 8 * t * eps)


_KKT_TOL = 1e-9
_EPS = torch.finfo(torch.float64).eps
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


class QPSolution(NamedTuple):
    """Minimiser ``v`` and its KKT residual (relative, in the rescaled problem)."""

    v: Tensor
    kkt_residual: Tensor


class _Scaled(NamedTuple):
    """The problem in ``u = s ⊙ v``: unit diagonal, ``max |b| = 1``."""

    K: Tensor
    b: Tensor
    lower: Tensor
    s: Tensor


class _Subsets(NamedTuple):
    free: Tensor  # (2^t, t): 1 where the variable is free (solved for), 0 where at its bound
    fixed: Tensor  # 1 - free
    pairs: Tensor  # (2^t, t, t): free ⊗ free
    identity: Tensor  # (2^t, t, t): diag(fixed)


@functools.lru_cache(maxsize=64)
def _subsets(t: int, device: torch.device) -> _Subsets:
    codes = torch.arange(2**t, device=device).unsqueeze(1)
    bits = 2 ** torch.arange(t, device=device)
    free = ((codes & bits) != 0).to(torch.float64)
    fixed = 1 - free
    return _Subsets(free, fixed, free[:, :, None] * free[:, None, :], torch.diag_embed(fixed))


def _scale(K: Tensor, b: Tensor, lower: Tensor) -> _Scaled:
    d = K.diagonal().sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    bn = b / d
    scale = bn.abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s = d / scale
    return _Scaled(K / (d[:, None] * d[None, :]), bn / scale, lower * s, s)


def _certificate(problem: _Scaled, u: Tensor) -> Tensor:
    """The certificate of :func:`kkt_residual` for candidates ``u`` of shape ``(..., t)``."""
    K, b, lower = problem.K, problem.b, problem.lower
    r = u @ K.T + b
    # What float64 rounding may have hidden in r: a candidate with huge multipliers (a
    # singular system solved as if it were not) has a tiny computed r but a large bound.
    rounding = (K.shape[0] + 4) * _EPS * (u.abs() @ K.abs().T + b.abs())
    slack = u - lower
    worst = torch.stack(
        [
            slack.neg().clamp(min=0),
            (rounding - r).clamp(min=0),
            torch.minimum(slack, r.abs() - rounding).clamp(min=0),
        ]
    )
    return worst.amax(dim=(0, -1))


def _unit_ratio(K: Tensor, b: Tensor, unit: Tensor | None) -> Tensor:
    """``max_k |b_k| / sqrt(K_kk)`` over ``unit`` (at most 1): the certificate's change of unit.

    The solvers work with ``max |b| = 1``; rescaling the problem to ``unit`` instead
    multiplies ``u``, ``Ku + b`` and the rounding bound alike, hence the certificate.
    """
    if unit is None:
        return torch.ones((), dtype=b.dtype, device=b.device)
    d = K.diagonal().sqrt()
    scale = (b / torch.where(d > 0, d, torch.ones_like(d))).abs().amax()
    return torch.where(unit > scale, scale / unit, torch.ones_like(scale))


def kkt_residual(
    K: Tensor, b: Tensor, lower: Tensor, v: Tensor, unit: Tensor | None = None
) -> Tensor:
    r"""Certificate of optimality of ``v`` (0 at the optimum, up to rounding).

    Measured in the rescaled problem (unit diagonal, ``|b_k| / sqrt(K_kk)`` divided by
    ``unit``, default its maximum), without dividing by the size of ``v``, as the largest of

    * bound violation :math:`(\ell_k - v_k)_+`,
    * infeasibility :math:`(e_k - r_k)_+` of :math:`r = Kv + b`, where :math:`e_k` bounds
      the float64 rounding of :math:`r_k` (so huge multipliers cannot hide a violation),
    * complementarity :math:`\min(v_k - \ell_k, (|r_k| - e_k)_+)`.

    For GEM's dual, :math:`r_k = \langle g_k, x \rangle` and ``unit`` is
    :math:`\lVert g \rVert` (plus :math:`m \sum_k \lVert g_k \rVert` with a margin
    :math:`m`): the rescaling divides :math:`r_k` by :math:`\lVert g_k \rVert` times it, so
    a residual :math:`\le \tau` certifies
    :math:`\langle g_k, x \rangle \ge -\tau \lVert g \rVert \lVert g_k \rVert` for every
    constraint (without a margin), with every multiplier above its bound on a
    constraint active to within the same tolerance. A convex QP has no other KKT points than
    its minimisers, so this certifies the solution.
    """
    problem = _scale(K, b, lower)
    return _certificate(problem, v * problem.s) * _unit_ratio(K, b, unit)


def _enumerate(problem: _Scaled) -> tuple[Tensor, Tensor]:
    """The candidate the certificate trusts most, and its certificate."""
    K, b, lower = problem.K, problem.b, problem.lower
    subsets = _subsets(K.shape[0], K.device)
    A = K * subsets.pairs + subsets.identity
    pinned = subsets.fixed * lower
    rhs = subsets.free * -(b + pinned @ K) + pinned
    u, info = torch.linalg.solve_ex(A, rhs)
    u = torch.where(torch.isfinite(u) & (info == 0)[:, None], u, lower).maximum(lower)
    # Every candidate that passes the certificate is a minimiser (a convex QP has no other
    # KKT points); the one the certificate trusts most is kept. Exactly singular subsets
    # (dependent constraints) either fail or tie with a nonsingular one.
    certificates = _certificate(problem, u)
    best = certificates.argmin().reshape(1)
    return u.index_select(0, best).squeeze(0), certificates.index_select(0, best).squeeze(0)


def _qpsolvers(problem: _Scaled, solver: str) -> Tensor:
    host = _Scaled(*(x.detach().cpu() for x in problem))
    # A zero constraint row (an objective that reaches no parameter) has nothing to solve
    # for: its multiplier stays at its bound. Backends that need K nonsingular fail on it.
    live = host.K.diagonal() > 0
    u = host.lower.clone()
    if bool(live.any()):
        P = host.K[live][:, live].numpy()
        q, lb = host.b[live].numpy(), host.lower[live].numpy()
        try:
            x = backend_solve(solver, P, q, lb=lb)
        except SolverError:
            try:
                x = backend_solve(solver, _nearby_convex(P), q, lb=lb)
            except SolverError:
                x = lb  # the active-set steps below then solve it from the bounds
        u[live] = torch.as_tensor(x, dtype=torch.float64)
    return _refine(host, u.maximum(host.lower)).to(problem.K.device)


def _nearby_convex(P: np.ndarray) -> np.ndarray:
    r"""``P + δI``, positive definite, with ``δ`` of the size of the Gram's rounding.

    A Gram matrix accumulated in fp32 from dependent rows (more constraints than
    dimensions, near-opposite rows) is indefinite by its rounding: eigenvalues down to
    about :math:`-t\,arepsilon_{32}` on the unit diagonal. Along such a direction the
    dual is unbounded below and backends give no answer. The shifted problem is a
    nearby one (a perturbation no larger than the rounding already in ``P``); its
    solution is then finished and certified against the original ``P``.
    """
    t = len(P)
    lowest = float(np.linalg.eigvalsh(P)[0])
    shift = 2 * max(-lowest, 0.0) + (t + 4) * float(_EPS)
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


def _refine(problem: _Scaled, u: Tensor) -> Tensor:
    """Finish a backend's solution exactly with Lawson–Hanson active-set steps.

    Backends stop at their tolerances, and on degenerate problems (a singular ``K`` from
    duplicate constraints or more constraints than parameters) DAQP alone was measured up
    to 2e-5 off. Starting from the backend's free set, the loop below (the active-set
    method of Lawson & Hanson's NNLS, on ``y = u − ℓ ≥ 0`` in Gram form, with least squares
    for singular subsystems) ends at an exact KKT point; from a good start it ends at once.
    The result replaces ``u`` only if its KKT residual is no larger.
    """
    K = problem.K.numpy()
    lower = problem.lower.numpy()
    q = problem.b.numpy() + K @ lower
    y = np.maximum(u.numpy() - lower, 0.0)
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
    refined = torch.as_tensor(y + lower, dtype=torch.float64)
    return refined if bool(_certificate(problem, refined) <= _certificate(problem, u)) else u


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


def is_host_solver(solver: str) -> bool:
    """Whether a resolved solver name runs on the host (reads the problem back from the device)."""
    return solver not in ("closed_form", "enumerate")


def resolve_solver(solver: str, t: int) -> str:
    """The solver ``"auto"`` stands for with ``t`` constraints; other names are checked.

    Raises:
        ValueError: ``"closed_form"`` with ``t ≠ 1``, or a name that is neither a solver of
            this module nor an installed qpsolvers backend.
    """
    if solver == "auto":
        if t == 1:
            return "closed_form"
        return "enumerate" if t <= MAX_ENUMERATE else "daqp"
    if solver == "closed_form" and t != 1:
        raise ValueError(f"solver 'closed_form' needs exactly one constraint, got {t}")
    if is_host_solver(solver):
        import qpsolvers

        if solver not in qpsolvers.available_solvers:
            raise ValueError(
                f"solver {solver!r} is not installed; choose 'auto', 'enumerate', "
                f"'closed_form' (t = 1) or a qpsolvers backend: "
                f"{', '.join(map(repr, sorted(qpsolvers.available_solvers)))}"
            )
    return solver


def solve_lower_bounded(
    K: Tensor, b: Tensor, lower: Tensor, solver: str = "auto", unit: Tensor | None = None
) -> QPSolution:
    """Solve ``min ½ vᵀKv + bᵀv  s.t.  v ≥ lower`` exactly.

    Args:
        K: ``(t, t)`` positive semi-definite matrix, float64.
        b: ``(t,)`` float64.
        lower: ``(t,)`` float64 lower bounds.
        solver: ``"auto"`` (see :func:`resolve_solver`), ``"closed_form"`` (``t = 1``),
            ``"enumerate"`` (any ``t``, but ``2^t`` linear systems), or a qpsolvers backend.
        unit: 0-d, the problem's own scale, at least ``|b_k| / sqrt(K_kk)`` for every ``k``
            (``‖g‖ + m Σ_k ‖g_k‖`` for GEM's dual); the certificate is relative to it. Default: the
            largest ``|b_k| / sqrt(K_kk)``, which is stricter.

    Returns:
        The minimiser and its KKT residual (see :func:`kkt_residual`), on ``K``'s device.
        With ``"closed_form"`` and ``"enumerate"`` nothing is copied to the host. A
        qpsolvers backend that gives no answer (an fp32-accumulated ``K`` of dependent
        rows is indefinite by its rounding) is given the nearby convex problem of
        ``_nearby_convex``, and if it fails on that too, the active-set finish starts from
        the bounds: there is always an answer, and its certificate says how good it is.

    Raises:
        ValueError: unknown or uninstalled solver.
    """
    solver = resolve_solver(solver, K.shape[0])
    problem = _scale(K, b, lower)
    if solver == "enumerate":
        u, certificate = _enumerate(problem)
    else:
        if solver == "closed_form":
            u = torch.maximum(problem.lower, -problem.b)
        else:
            u = _qpsolvers(problem, solver)
        certificate = _certificate(problem, u)
    v = torch.maximum(u / problem.s, lower)  # undo the rescaling without rounding below a bound
    return QPSolution(v, certificate * _unit_ratio(K, b, unit))

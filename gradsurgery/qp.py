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
    :math:`2^t` choices of free variables gives a linear system; the optimum is the
    candidate that satisfies the KKT conditions with the lowest objective. All candidates
    are solved in one batched call, so the cost is a fixed number of kernel launches
    whatever the data. ``"auto"`` picks it on accelerators for ``2 ≤ t ≤ MAX_ENUMERATE``.
any qpsolvers backend (``"daqp"``, ``"quadprog"``, ``"osqp"``, ``"clarabel"``, ...)
    On the CPU in float64 (for accelerator tensors, one device-to-host copy of ``t² + t``
    numbers), then polished: the stationarity equations of the active set the backend
    found are solved exactly, and that point is kept if its KKT residual is lower.
    ``"daqp"``, which ``"auto"`` picks on the CPU and for large ``t``, is exact
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
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradsurgery import sync
from gradsurgery.errors import SolverError

__all__ = [
    "MAX_ENUMERATE",
    "QPSolution",
    "is_host_solver",
    "kkt_residual",
    "resolve_solver",
    "solve_lower_bounded",
]

MAX_ENUMERATE = 8
_KKT_TOL = 1e-9
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


@functools.lru_cache(maxsize=64)
def _subsets(t: int, device: torch.device) -> Tensor:
    """All ``2^t`` subsets of ``range(t)`` as a ``(2^t, t)`` float64 0/1 matrix."""
    codes = torch.arange(2**t, device=device).unsqueeze(1)
    bits = 2 ** torch.arange(t, device=device)
    return ((codes & bits) != 0).to(torch.float64)


def _scaled(K: Tensor, b: Tensor, lower: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rescale ``v = u / s`` so that ``diag(S K S) = 1`` and ``max|S b| = 1``."""
    d = K.diagonal().sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    bn = b / d
    scale = bn.abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s = d / scale
    Kn = K / (d[:, None] * d[None, :])
    return Kn, bn / scale, lower * s, s


def kkt_residual(K: Tensor, b: Tensor, lower: Tensor, v: Tensor) -> Tensor:
    """Largest violation of the KKT conditions of the problem at ``v`` (0 at the optimum).

    Measured in the rescaled problem (unit diagonal, ``max |b| = 1``) as the largest of
    primal infeasibility ``(ℓ − v)₊``, dual infeasibility ``(−(Kv + b))₊`` and
    complementarity ``|min(v − ℓ, Kv + b)|``, relative to ``1 + |v|_∞``.
    """
    Kn, bn, ln, s = _scaled(K, b, lower)
    u = v * s
    r = Kn @ u + bn
    slack = u - ln
    worst = torch.stack(
        [slack.neg().clamp(min=0), r.neg().clamp(min=0), torch.minimum(slack, r).abs()]
    ).amax()
    return worst / (1 + u.abs().amax())


def _enumerate(K: Tensor, b: Tensor, lower: Tensor) -> Tensor:
    t = K.shape[0]
    free = _subsets(t, K.device)
    fixed = 1 - free
    A = K * (free[:, :, None] * free[:, None, :]) + torch.diag_embed(fixed)
    pinned = fixed * lower
    rhs = free * -(b + pinned @ K) + pinned
    u, info = torch.linalg.solve_ex(A, rhs)
    u = torch.where(torch.isfinite(u), u, lower).maximum(lower)
    r = u @ K + b
    tol = _KKT_TOL * (1 + u.abs().amax(dim=1, keepdim=True))
    kkt = (info == 0) & (r >= -tol).all(dim=1) & ((r * free).abs() <= tol).all(dim=1)
    objective = 0.5 * ((u @ K) * u).sum(dim=1) + u @ b
    objective = torch.where(kkt, objective, torch.full_like(objective, float("inf")))
    # Among the KKT points (all optimal) take the lowest objective. If rounding rejects
    # them all, index 0 (every variable at its bound, always feasible) is returned and
    # the caller sees it in the KKT residual.
    best = objective.argmin().reshape(1)
    return u.index_select(0, best).squeeze(0)


def _qpsolvers(K: Tensor, b: Tensor, lower: Tensor, solver: str) -> Tensor:
    import qpsolvers

    if solver not in qpsolvers.available_solvers:
        raise ValueError(
            f"qpsolvers backend {solver!r} is not installed; available: "
            f"{', '.join(sorted(qpsolvers.available_solvers))} (or 'enumerate' for t ≤ "
            f"{MAX_ENUMERATE})"
        )
    P, q, lb = (x.detach().cpu().numpy() for x in (K, b, lower))
    options = _BACKEND_OPTIONS.get(solver, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qpsolvers warns about dense-to-sparse conversions
        try:
            u = qpsolvers.solve_qp(P, q, lb=lb, solver=solver, verbose=False, **options)
        except Exception as error:  # backends raise their own exception types
            raise SolverError(f"qpsolvers backend {solver!r} failed: {error}") from error
    if u is None or not np.all(np.isfinite(u)):
        raise SolverError(
            f"qpsolvers backend {solver!r} returned no solution (t = {len(q)}); the problem "
            "is always feasible, so this is numerical: try solver='daqp' or 'enumerate'"
        )
    return torch.as_tensor(_polish(P, q, lb, np.maximum(u, lb)), dtype=torch.float64).to(K.device)


def _kkt(K: np.ndarray, b: np.ndarray, lower: np.ndarray, u: np.ndarray) -> float:
    r = K @ u + b
    slack = u - lower
    worst = np.max(np.concatenate([-slack, -r, np.abs(np.minimum(slack, r))]))
    return float(max(worst, 0.0) / (1 + np.abs(u).max()))


def _polish(K: np.ndarray, b: np.ndarray, lower: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Re-solve exactly on the active set that a backend found; keep the better point.

    Backends stop at their tolerances; on degenerate problems (a singular ``K``: duplicate
    constraints, more constraints than parameters) DAQP was measured 2e-5 off. Solving the
    stationarity equations of the variables above their bounds by least squares gives the
    exact optimum for that active set; it replaces ``u`` only if its KKT residual is lower.
    """
    free = u > lower + _KKT_TOL * (1 + np.abs(u).max())
    candidate = lower.copy()
    if free.any():
        pinned = ~free
        rhs = -(b[free] + K[np.ix_(free, pinned)] @ lower[pinned])
        candidate[free] = np.linalg.lstsq(K[np.ix_(free, free)], rhs, rcond=None)[0]
    candidate = np.maximum(candidate, lower)
    return candidate if _kkt(K, b, lower, candidate) <= _kkt(K, b, lower, u) else u


def is_host_solver(solver: str) -> bool:
    """Whether a resolved solver name runs on the host (reads the problem back from the device)."""
    return solver not in ("closed_form", "enumerate")


def resolve_solver(solver: str, t: int, device: torch.device) -> str:
    """The solver ``"auto"`` stands for at this size and device; others are checked."""
    if solver == "auto":
        if t == 1:
            return "closed_form"
        on_device = not sync.host_reads_are_free(device)
        return "enumerate" if on_device and t <= MAX_ENUMERATE else "daqp"
    if solver == "closed_form" and t != 1:
        raise ValueError(f"solver 'closed_form' needs exactly one constraint, got {t}")
    return solver


def solve_lower_bounded(K: Tensor, b: Tensor, lower: Tensor, solver: str = "auto") -> QPSolution:
    """Solve ``min ½ vᵀKv + bᵀv  s.t.  v ≥ lower`` exactly.

    Args:
        K: ``(t, t)`` positive semi-definite matrix, float64.
        b: ``(t,)`` float64.
        lower: ``(t,)`` float64 lower bounds.
        solver: ``"auto"`` (see :func:`resolve_solver`), ``"closed_form"`` (``t = 1``),
            ``"enumerate"`` (any ``t``, but ``2^t`` linear systems), or a qpsolvers backend.

    Returns:
        The minimiser and its KKT residual (see :func:`kkt_residual`), on ``K``'s device.
        With ``"enumerate"`` nothing is copied to the host.

    Raises:
        ValueError: unknown or uninstalled solver.
        SolverError: a qpsolvers backend failed.
    """
    solver = resolve_solver(solver, K.shape[0], K.device)
    Kn, bn, ln, s = _scaled(K, b, lower)
    if solver == "closed_form":
        u = torch.maximum(ln, -bn)
    elif solver == "enumerate":
        u = _enumerate(Kn, bn, ln)
    else:
        u = _qpsolvers(Kn, bn, ln, solver)
    v = torch.maximum(u / s, lower)  # undo the rescaling without rounding below a bound
    return QPSolution(v, kkt_residual(K, b, lower, v))

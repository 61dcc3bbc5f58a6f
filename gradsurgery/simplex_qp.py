r"""Quadratic programs over the probability simplex, solved exactly.

Two problems in the weights :math:`w \in \Delta_T = \{w \ge 0, \textstyle\sum_t w_t = 1\}`
of ``T`` gradients with Gram matrix :math:`K`:

:func:`min_norm_weights` (MGDA, Sener & Koltun 2018)
    :math:`\min_{w \in \Delta_T} \tfrac12 w^\top K w`: the min-norm point of the gradients'
    convex hull. Its norm is zero exactly at a Pareto-stationary point. ``"enumerate"``
    (default for ``T ≤ MAX_ENUMERATE``) solves all :math:`2^T - 1` supports in one batched
    call on the tensors' device, without host synchronisation.

:func:`lfmlf_qp` (LF-MLF's Problem 2, Mao et al. 2022)
    :math:`\min_{w \in \Delta_T} \tfrac12 w^\top K w + c^\top w` s.t. :math:`K w \ge 0`.
    Solved on the host through a qpsolvers backend, then *polished*: the KKT system of the
    active set the backend found is solved exactly and kept if it certifies better. Every
    solution comes with a certificate (:func:`lfmlf_kkt_residual`): multipliers found by
    non-negative least squares, independent of the solver.

Both problems are scaled by the largest diagonal entry of ``K`` first (the minimiser is
invariant to it), so tolerances mean the same for gradients of any size.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor

from gradsurgery import qp
from gradsurgery.errors import SolverError

__all__ = [
    "SimplexSolution",
    "lfmlf_kkt_residual",
    "lfmlf_qp",
    "min_norm_kkt_residual",
    "min_norm_weights",
    "raise_if_inexact",
]

_TOL = 1e-9


class SimplexSolution(NamedTuple):
    """Weights on the simplex and the KKT residual that certifies them (0 at the optimum)."""

    w: Tensor
    kkt_residual: Tensor


def raise_if_inexact(solution: SimplexSolution, problem: str) -> None:
    """Raise :class:`SolverError` if ``solution`` is not certified to ``qp.KKT_TOLERANCE``."""
    residual = float(solution.kkt_residual)
    if not residual <= qp.KKT_TOLERANCE:
        raise SolverError(
            f"{problem} was not solved to tolerance (KKT residual {residual:.2e} > "
            f"{qp.KKT_TOLERANCE:.0e}); nothing was changed. Try another solver"
        )


def _unit_scale(K: Tensor) -> Tensor:
    scale = K.diagonal().amax()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# -- MGDA: the min-norm point ---------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _augmented_masks(t: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For every support: the 0/1 mask, the (T+1)² system's fixed part and its K mask."""
    codes = torch.arange(2**t, device=device).unsqueeze(1)
    free = ((codes & (2 ** torch.arange(t, device=device))) != 0).to(torch.float64)
    n = free.shape[0]
    system = torch.zeros(n, t + 1, t + 1, dtype=torch.float64, device=device)
    system[:, :t, :t] = torch.diag_embed(1 - free)  # fixed weights: w_i = 0
    system[:, :t, t] = -free  # free weights: (K w)_i − λ = 0
    system[:, t, :t] = free  # Σ_free w = 1
    pairs = torch.zeros_like(system)
    pairs[:, :t, :t] = free[:, :, None] * free[:, None, :]
    return free, system, pairs


def min_norm_kkt_residual(K: Tensor, w: Tensor) -> Tensor:
    """KKT residual of ``w`` for ``min ½ wᵀKw`` on the simplex, relative to ``max diag K``.

    At the optimum ``λ = wᵀKw`` and ``(Kw)_i ≥ λ`` for all ``i``, with equality where
    ``w_i > 0``; the residual is the largest violation of that, of ``w ≥ 0`` and of
    ``Σ w = 1``.
    """
    Kn = K / _unit_scale(K)
    Kw = Kn @ w
    lam = w @ Kw
    return torch.stack(
        [
            (w.sum() - 1).abs(),
            w.neg().clamp(min=0).amax(),
            (lam - Kw).clamp(min=0).amax(),
            (w.clamp(min=0) * (Kw - lam)).abs().amax(),
        ]
    ).amax()


def _enumerate_min_norm(K: Tensor) -> Tensor:
    t = K.shape[0]
    free, system, pairs = _augmented_masks(t, K.device)
    A = system.clone()
    A[:, :t, :t] += K * pairs[:, :t, :t]
    rhs = torch.zeros(free.shape[0], t + 1, dtype=K.dtype, device=K.device)
    rhs[:, t] = 1
    solution, info = torch.linalg.solve_ex(A, rhs)
    w = torch.where(torch.isfinite(solution[:, :t]), solution[:, :t], torch.zeros_like(free))
    Kw = w @ K.T
    lam = (w * Kw).sum(dim=1, keepdim=True)
    violation = torch.maximum(w.neg().amax(dim=1), (lam - Kw).amax(dim=1))
    violation = torch.where(info == 0, violation, torch.full_like(violation, float("inf")))
    objective = 0.5 * lam.squeeze(1)
    accepted = violation <= _TOL
    objective = torch.where(accepted, objective, torch.full_like(objective, float("inf")))
    best = torch.where(accepted.any(), objective.argmin(), violation.argmin()).reshape(1)
    return w.index_select(0, best).squeeze(0).clamp(min=0)


def min_norm_weights(K: Tensor, solver: str = "auto") -> SimplexSolution:
    """The min-norm point of the convex hull of ``T`` gradients, as weights on the simplex.

    Args:
        K: ``(T, T)`` Gram matrix (float64), positive semi-definite.
        solver: ``"auto"`` (``"enumerate"`` for ``T ≤ MAX_ENUMERATE``, else ``"daqp"``),
            ``"enumerate"``, or a qpsolvers backend.

    Returns:
        ``w`` with ``Σ w = 1``, ``w ≥ 0`` and ``K w ≥ wᵀKw`` (so ``d = Jᵀw`` is a common
        non-ascent direction), and its KKT residual; on ``K``'s device.
    """
    t = K.shape[0]
    if solver == "auto":
        solver = "enumerate" if t <= qp.MAX_ENUMERATE else "daqp"
    else:
        qp.resolve_solver(solver, t)
    if solver == "enumerate":
        w = _enumerate_min_norm(K / _unit_scale(K))
    else:
        # The min-norm point satisfies Kw ≥ wᵀKw ≥ 0, so adding LF-MLF's constraint Kw ≥ 0
        # changes nothing: it is LF-MLF's problem with c = 0, polished and certified alike.
        w = lfmlf_qp(K, torch.zeros_like(K[0]), solver).w
    return SimplexSolution(w, min_norm_kkt_residual(K, w))


# -- LF-MLF: Problem 2 ----------------------------------------------------------------------


def _lfmlf_certificate(K: np.ndarray, c: np.ndarray, w: np.ndarray) -> float:
    t = len(c)
    Kw = K @ w
    tol = 1e-7 * (1 + np.abs(w).max())
    at_zero = np.flatnonzero(w <= tol)
    at_descent = np.flatnonzero(Kw <= tol)
    # Kw + c = λ·1 + μ + K ν,  μ ≥ 0 on {w_i = 0},  ν ≥ 0 on {(Kw)_i = 0};  λ free.
    basis = np.hstack([np.ones((t, 1)), -np.ones((t, 1)), np.eye(t)[:, at_zero], K[:, at_descent]])
    multipliers, stationarity = nnls(basis, Kw + c, maxiter=50 * basis.shape[1])
    mu = multipliers[2 : 2 + len(at_zero)]
    nu = multipliers[2 + len(at_zero) :]
    complementarity = max(
        float(np.max(mu * w[at_zero], initial=0.0)), float(np.max(nu * Kw[at_descent], initial=0.0))
    )
    primal = max(abs(w.sum() - 1), float(np.max(-w, initial=0.0)), float(np.max(-Kw, initial=0.0)))
    scale = 1 + np.abs(c).max() + np.abs(Kw).max()
    return float(max(primal, stationarity / scale, complementarity / scale))


def lfmlf_kkt_residual(K: Tensor, c: Tensor, w: Tensor) -> Tensor:
    """KKT residual of ``w`` for LF-MLF's Problem 2 (0 at the optimum).

    Primal feasibility (``Σ w = 1``, ``w ≥ 0``, ``Kw ≥ 0``), stationarity
    ``Kw + c = λ1 + μ + Kν`` with multipliers ``μ, ν ≥ 0`` on the active constraints (found by
    non-negative least squares) and complementarity, relative to the problem's scale after
    dividing ``K`` and ``c`` by ``max diag K``.
    """
    scale = _unit_scale(K)
    host = [x.detach().cpu().double().numpy() for x in (K / scale, c / scale, w)]
    return torch.tensor(_lfmlf_certificate(*host), dtype=torch.float64, device=K.device)


def _polish_lfmlf(K: np.ndarray, c: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Solve the KKT system of ``w``'s active set exactly; keep it if it certifies better."""
    t = len(c)
    tol = 1e-7 * (1 + np.abs(w).max())
    active = np.vstack([np.ones((1, t)), np.eye(t)[w <= tol], K[K @ w <= tol]])
    m = active.shape[0]
    system = np.block([[K, -active.T], [active, np.zeros((m, m))]])
    rhs = np.concatenate([-c, [1.0], np.zeros(m - 1)])
    candidate: np.ndarray = np.linalg.lstsq(system, rhs, rcond=None)[0][:t]
    candidate = np.maximum(candidate, 0.0)
    candidate /= max(candidate.sum(), 1e-300)
    if _lfmlf_certificate(K, c, candidate) <= _lfmlf_certificate(K, c, w):
        return candidate
    return w


def lfmlf_qp(K: Tensor, c: Tensor, solver: str = "daqp") -> SimplexSolution:
    """Solve LF-MLF's Problem 2: ``min ½wᵀKw + cᵀw`` on the simplex with ``Kw ≥ 0``.

    Args:
        K: ``(T, T)`` Gram matrix of the objectives' gradients (float64).
        c: ``(T,)`` inner products of each gradient with the accumulated direction ``ḡ``.
        solver: a qpsolvers backend (see ``docs/lfmlf.md`` for the measured choice).

    Returns:
        The weights (on ``K``'s device) and their KKT certificate.

    Raises:
        ValueError: unknown or uninstalled solver.
        SolverError: the backend failed.
    """
    t = K.shape[0]
    if solver in ("auto", "closed_form", "enumerate"):
        raise ValueError(f"LF-MLF needs a qpsolvers backend such as 'daqp', got {solver!r}")
    qp.resolve_solver(solver, t)
    scale = _unit_scale(K)
    Kn, cn = ((x / scale).detach().cpu().numpy() for x in (K, c))
    w = qp.backend_solve(
        solver,
        Kn,
        cn,
        G=-Kn,
        h=np.zeros(t),
        A=np.ones((1, t)),
        b=np.ones(1),
        lb=np.zeros(t),
    )
    w = _polish_lfmlf(Kn, cn, np.maximum(w, 0.0))
    residual = _lfmlf_certificate(Kn, cn, w)
    return SimplexSolution(
        torch.as_tensor(w, dtype=torch.float64).to(K.device),
        torch.tensor(residual, dtype=torch.float64, device=K.device),
    )

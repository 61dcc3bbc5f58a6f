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
    non-negative least squares, independent of the solver. (The min-norm point through a
    qpsolvers backend, for ``T > MAX_ENUMERATE``, is handled the same way.)

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
    "min_norm_point",
    "min_norm_weights",
    "raise_if_inexact",
]


class SimplexSolution(NamedTuple):
    """Weights on the simplex and the KKT residual that certifies them (0 at the optimum)."""

    w: Tensor
    kkt_residual: Tensor


def raise_if_inexact(solution: SimplexSolution, problem: str, tolerance: float) -> None:
    """Raise :class:`SolverError` if ``solution`` is not certified to ``tolerance``."""
    residual = float(solution.kkt_residual)
    if not residual <= tolerance:
        raise SolverError(
            f"{problem} was not solved to tolerance (KKT residual {residual:.2e} > "
            f"{tolerance:.1e}); nothing was changed. Try another solver"
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
    # Every candidate, clipped to the simplex, is feasible; the optimum is one of them, so
    # the least objective wins. (A dual-feasibility test with a tolerance would admit wrong
    # supports when the gradients' norms differ by orders of magnitude.)
    w = w.clamp(min=0)
    total = w.sum(dim=1, keepdim=True)
    usable = (info == 0) & (total.squeeze(1) > 0)
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    objective = ((w @ K.T) * w).sum(dim=1)
    objective = torch.where(usable, objective, torch.full_like(objective, float("inf")))
    return w.index_select(0, objective.argmin().reshape(1)).squeeze(0)


def _two_min_norm(K: Tensor) -> Tensor:
    """The min-norm point of two gradients in closed form: the segment's nearest point to 0.

    ``w_0 ∝ clamp(K_11 − K_01, 0, ·)`` and ``w_1 ∝ clamp(K_00 − K_01, 0, ·)`` over
    ``K_00 + K_11 − 2 K_01``; each weight is computed from its own numerator (not as
    ``1 − w_0``), so a weight of 1e-26 next to one of 1 keeps its digits. Equal gradients
    (numerators both zero) give equal weights.
    """
    w = torch.stack([K[1, 1] - K[0, 1], K[0, 0] - K[0, 1]]).clamp(min=0)
    total = w.sum()
    return torch.where(total > 0, w / torch.where(total > 0, total, 1), 0.5)


def min_norm_point(K: Tensor, solver: str = "auto") -> Tensor:
    """The weights of :func:`min_norm_weights` without their certificate (the fast path)."""
    t = K.shape[0]
    if solver == "auto":
        solver = "enumerate" if t <= qp.MAX_ENUMERATE else "daqp"
    else:
        qp.resolve_solver(solver, t)
    if solver == "enumerate":
        if t == 1:
            return torch.ones_like(K[0])
        if t == 2:
            return _two_min_norm(K / _unit_scale(K))
        return _enumerate_min_norm(K / _unit_scale(K))
    Kn = K / _unit_scale(K)
    w = _min_norm_by_nnls(Kn, solver)
    residual, objective = torch.stack([min_norm_kkt_residual(K, w), w @ Kn @ w]).tolist()
    if residual <= _NNLS_EXACT * t or objective <= _NNLS_EXACT * t:
        return w  # certified, or d = 0 to the rounding of K itself (a Pareto-stationary point)
    # Near (not at) a Pareto-stationary point 1 − s carries ‖d‖² and the reformulation loses
    # digits: the simplex problem itself, finished by the primal active-set method, is kept
    # if better.
    exact = _simplex_on_host(K, torch.zeros_like(K[0]), solver, descent=False).w
    better = min_norm_kkt_residual(K, exact) < min_norm_kkt_residual(K, w)
    return exact if bool(better) else w


_NNLS_EXACT = 64 * torch.finfo(torch.float64).eps


def _min_norm_by_nnls(K: Tensor, solver: str) -> Tensor:
    r"""The min-norm point from a non-negative least-squares problem (Gram form), on the host.

    With :math:`\hat g_t = (g_t, 1)`, :math:`u^* = \arg\min_{u \ge 0}
    \lVert \sum_t u_t \hat g_t - e_{p+1} \rVert^2`, i.e. :math:`\min_{u \ge 0}
    \tfrac12 u^\top (K + 11^\top) u - 1^\top u`, gives :math:`w = u^* / \sum_t u^*_t`:
    its KKT conditions :math:`\langle g_t, d \rangle \ge (1 - s)/s` (equality where
    :math:`u_t > 0`, :math:`s = \sum u`, :math:`d = J^\top w`) are MGDA's, with
    :math:`\lVert d \rVert^2 = (1 - s)/s`. Solved by :func:`gradsurgery.qp.solve_lower_bounded`
    (the backend, then the exact Lawson–Hanson finish); ``s ≥ 1/(1 + max K_tt) > 0``.
    """
    t = K.shape[0]
    ones = torch.ones(t, dtype=K.dtype, device=K.device)
    u = qp.solve_lower_bounded(K + 1, -ones, torch.zeros_like(ones), solver).v.clamp(min=0)
    total = u.sum()
    return torch.where(total > 0, u / torch.where(total > 0, total, 1), 1 / t)


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
    w = min_norm_point(K, solver)
    return SimplexSolution(w, min_norm_kkt_residual(K, w))


# -- LF-MLF: Problem 2 ----------------------------------------------------------------------


def _unit_problem(K: Tensor, c: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``K`` and ``c`` on the host, divided by ``max diag K`` (the minimiser does not change)."""
    scale = _unit_scale(K)
    Kn, cn = ((x / scale).detach().cpu().double().numpy() for x in (K, c))
    return Kn, cn


def _descent_rows(K: np.ndarray) -> np.ndarray:
    """LF-MLF's constraint rows ``K w ≥ 0``, row ``t`` divided by ``‖g_t‖ = sqrt(K_tt)``.

    The feasible set is the same; a violation then reads as a cosine between ``d`` and
    ``g_t`` (times ``‖d‖``), so a language whose gradient is 10⁻³ of the largest is held to
    the same tolerance as the largest. Unscaled, its row sits inside any solver's
    feasibility tolerance and ``d`` may raise its loss to first order.
    """
    norms = np.sqrt(np.maximum(np.diag(K), 0.0))
    scaled: np.ndarray = K / np.where(norms > 0, norms, 1.0)[:, None]
    return scaled


def _certificate(K: np.ndarray, c: np.ndarray, w: np.ndarray, descent: bool = True) -> float:
    """KKT residual on the simplex, with LF-MLF's ``Kw ≥ 0`` when ``descent``."""
    t = len(c)
    Kw = K @ w
    D = _descent_rows(K)
    Dw = D @ w
    tol = 1e-9 * (1 + np.abs(w).max())
    at_zero = np.flatnonzero(w <= tol)
    at_descent = np.flatnonzero(Dw <= tol) if descent else np.zeros(0, dtype=int)
    # Kw + c = λ·1 + μ + Dᵀν,  μ ≥ 0 on {w_i = 0},  ν ≥ 0 on {(Dw)_i = 0};  λ free.
    basis = np.hstack([np.ones((t, 1)), -np.ones((t, 1)), np.eye(t)[:, at_zero], D[at_descent].T])
    multipliers, stationarity = nnls(basis, Kw + c, maxiter=50 * basis.shape[1])
    mu = multipliers[2 : 2 + len(at_zero)]
    nu = multipliers[2 + len(at_zero) :]
    complementarity = max(
        float(np.max(mu * w[at_zero], initial=0.0)), float(np.max(nu * Dw[at_descent], initial=0.0))
    )
    infeasible = float(np.max(-Dw, initial=0.0)) if descent else 0.0
    primal = max(abs(w.sum() - 1), float(np.max(-w, initial=0.0)), infeasible)
    scale = 1 + np.abs(c).max() + np.abs(Kw).max()
    return float(max(primal, stationarity / scale, complementarity / scale))


def lfmlf_kkt_residual(K: Tensor, c: Tensor, w: Tensor) -> Tensor:
    """KKT residual of ``w`` for LF-MLF's Problem 2 (0 at the optimum).

    Primal feasibility (``Σ w = 1``, ``w ≥ 0``, ``(Kw)_t / sqrt(K_tt) ≥ 0``: each language's
    constraint on its own scale), stationarity ``Kw + c = λ1 + μ + Dᵀν`` (``D`` the scaled
    constraint rows) with multipliers ``μ, ν ≥ 0`` on the active constraints (found by
    non-negative least squares) and complementarity, relative to the problem's scale after
    dividing ``K`` and ``c`` by ``max diag K``.
    """
    Kn, cn = _unit_problem(K, c)
    residual = _certificate(Kn, cn, w.detach().cpu().double().numpy())
    return torch.tensor(residual, dtype=torch.float64, device=K.device)


def _constraint_rows(K: np.ndarray, descent: bool) -> np.ndarray:
    """The inequality rows ``C`` of ``C w ≥ 0``: ``w ≥ 0``, and LF-MLF's ``K w ≥ 0``."""
    eye = np.eye(len(K))
    return np.vstack([eye, _descent_rows(K)]) if descent else eye


def _active_set(K: np.ndarray, c: np.ndarray, w: np.ndarray, descent: bool) -> np.ndarray:
    """Primal active-set method from a feasible ``w``: exact optimum of the simplex problem.

    Each iteration minimises over the face given by the working set (null-space method;
    a direction of zero curvature is followed to the next constraint, since the simplex
    is bounded), or, at a face's minimum, releases the constraint with the most negative
    multiplier; it stops when none is negative. Backends stop at their tolerances and can
    settle on a wrong active set when gradient norms differ by orders of magnitude
    (measured: a min-norm direction 2.6× too long); started from their answer, this ends at
    once when it was right.
    """
    t = len(c)
    C = _constraint_rows(K, descent)
    tol = 1e-12
    working = C @ w <= tol
    visits: dict[bytes, float] = {}  # the objective when each working set was last entered
    for _ in range(10 * t + 10):
        objective = float(0.5 * w @ K @ w + c @ w)
        key = working.tobytes()
        if key in visits and objective >= visits[key] - 1e-15 * (1 + abs(objective)):
            # back at a working set without progress: degenerate constraints cycle here
            # (the iteration cap would change nothing); the certificate decides
            return w
        visits[key] = objective
        equalities = np.vstack([np.ones((1, t)), C[working]])
        # onto the working set's face exactly: the backend's answer meets the constraints
        # only to its tolerance
        target = np.concatenate([[1.0], np.zeros(int(working.sum()))])
        w = w + np.linalg.lstsq(equalities, target - equalities @ w, rcond=None)[0]
        gradient = K @ w + c
        _, singular, vt = np.linalg.svd(equalities)
        rank = int(np.sum(singular > tol * max(1.0, singular.max(initial=0.0))))
        Z = vt[rank:].T
        step = np.zeros(t)
        if Z.shape[1]:
            H = Z.T @ K @ Z
            r = Z.T @ gradient
            y = -np.linalg.lstsq(H, r, rcond=None)[0]
            flat = r + H @ y  # the part of the gradient on directions of zero curvature
            rounding = 1e-9 * (np.linalg.norm(r) + np.abs(H).max() * np.linalg.norm(y))
            if np.linalg.norm(flat) > rounding:
                # descend along zero curvature; length 2 exceeds the simplex's diameter, so a
                # constraint blocks the step first
                y = -2 * flat / np.linalg.norm(flat)
            step = Z @ y
        if np.linalg.norm(step) <= tol * (1 + np.linalg.norm(w)):
            multipliers = np.linalg.lstsq(equalities.T, gradient, rcond=None)[0][1:]
            if multipliers.size == 0 or multipliers.min() >= -tol * (1 + np.abs(gradient).max()):
                return w
            working[np.flatnonzero(working)[int(np.argmin(multipliers))]] = False
            continue
        rates = C @ step
        blocking = (~working) & (rates < -tol * np.linalg.norm(step))
        ratios = np.full(len(C), np.inf)
        ratios[blocking] = np.maximum(C[blocking] @ w, 0.0) / -rates[blocking]
        alpha = min(1.0, float(ratios.min(initial=np.inf)))
        w = w + alpha * step
        if alpha < 1.0:
            working[int(np.argmin(ratios))] = True
    return w


def _onto_simplex(w: np.ndarray) -> np.ndarray:
    w = np.maximum(w, 0.0)
    projected: np.ndarray = w / max(w.sum(), 1e-300)
    return projected


def _simplex_on_host(K: Tensor, c: Tensor, solver: str, descent: bool) -> SimplexSolution:
    """A qpsolvers backend's answer, finished by :func:`_active_set` and certified."""
    t = K.shape[0]
    Kn, cn = _unit_problem(K, c)
    constraints = {"G": -_descent_rows(Kn), "h": np.zeros(t)} if descent else {}
    start = qp.backend_solve(
        solver, Kn, cn, A=np.ones((1, t)), b=np.ones(1), lb=np.zeros(t), **constraints
    )
    start = _onto_simplex(start)  # backends meet w ≥ 0 only to their tolerance
    candidates = [start, _onto_simplex(_active_set(Kn, cn, start, descent))]
    if descent and np.min(_descent_rows(Kn) @ start) < 0:
        # The active-set method needs a feasible start; the min-norm point always is one
        # (K w ≥ wᵀKw ≥ 0), whatever the backend's answer was.
        feasible = min_norm_weights(torch.from_numpy(Kn)).w.numpy()
        candidates.append(_onto_simplex(_active_set(Kn, cn, feasible, descent)))
    residuals = [_certificate(Kn, cn, w, descent) for w in candidates]
    best = int(np.argmin(residuals))
    return SimplexSolution(
        torch.as_tensor(candidates[best], dtype=torch.float64).to(K.device),
        torch.tensor(residuals[best], dtype=torch.float64, device=K.device),
    )


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
    return _simplex_on_host(K, c, solver, descent=True)

"""Independent float64 references for the GEM projection.

:func:`project` uses NNLS (Lawson-Hanson) in SciPy. With ``u = v - m ≥ 0`` the dual
``min ½‖g + Jᵀv‖²  s.t.  v ≥ m`` is the non-negative least squares problem
``min ‖Jᵀu − y‖  s.t.  u ≥ 0`` with ``y = −(g + m Jᵀ1)``; SciPy's ``nnls`` solves it on the
full ``(p, t)`` matrix, sharing no code with the library's solvers. It runs on unit rows
(``u_k ≥ 0`` scaled by ``‖g_k‖`` is still ``≥ 0``). SciPy's ``nnls`` is not exact on
rank-deficient rows, though: on 8 rows of rank 4 in 31 dimensions it returned a point that
violates a constraint by 4 % of ``‖g‖ ‖g_k‖`` (1.7 % on raw rows of norms 1e-5 to 1e3).
So without a margin, and for up to ``BRUTE_FORCE_ROWS`` rows, :func:`project` uses
:func:`project_brute`.

:func:`project_brute` works on the primal instead, by brute force over active sets, with
SVD-based pseudo-inverses: exact on rank-deficient and duplicated rows, where the dual has
no unique solution. The tests check that the two agree on dependent constraints.
"""

import itertools

import numpy as np
from scipy.optimize import nnls

BRUTE_FORCE_ROWS = 10


def solve_dual(g: np.ndarray, J: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """``g + Jᵀv*`` for the dual's minimiser ``v* ≥ margin`` (whether or not g violates)."""
    g = np.asarray(g, dtype=np.float64)
    J = np.asarray(J, dtype=np.float64)
    base = g + margin * J.sum(axis=0)
    norms = np.linalg.norm(J, axis=1)
    unit = J / np.where(norms > 0, norms, 1.0)[:, None]
    u, _ = nnls(unit.T, -base, maxiter=50 * max(1, J.shape[0]))
    return base + unit.T @ u


def project(g: np.ndarray, J: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """GEM's update: ``g`` if no constraint is violated, else the dual's solution.

    By brute force (:func:`project_brute`) without a margin and with up to
    ``BRUTE_FORCE_ROWS`` rows, else by :func:`solve_dual`.
    """
    g = np.asarray(g, dtype=np.float64)
    J = np.asarray(J, dtype=np.float64)
    if np.all(J @ g >= 0):
        return g
    if margin == 0 and len(J) <= BRUTE_FORCE_ROWS:
        return project_brute(g, J)
    return solve_dual(g, J, margin)


def project_brute(g: np.ndarray, J: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``g`` onto ``{x : Jx ≥ 0}``, by brute force (``t ≤ 10``).

    The projection lies in the relative interior of a face ``{Jx ≥ 0, J_A x = 0}`` of the
    cone, near which the cone coincides with the subspace ``ker J_A``; so it is the
    projection of ``g`` onto ``ker J_A`` for some subset ``A`` of the rows. Every subset is
    tried (``g − pinv(J_A) J_A g`` on unit rows, singular values below 1e-12 of the largest
    treated as zero), and the closest feasible candidate wins. Shares nothing with the dual.
    """
    g = np.asarray(g, dtype=np.float64)
    J = np.asarray(J, dtype=np.float64)
    if np.all(J @ g >= 0):
        return g
    norms = np.linalg.norm(J, axis=1)
    unit = J / np.where(norms > 0, norms, 1.0)[:, None]  # the same cone and the same kernels
    masks = np.array(list(itertools.product([0.0, 1.0], repeat=len(J))))
    J_A = masks[:, :, None] * unit[None]
    candidates = g[None] - np.einsum("spt,st->sp", np.linalg.pinv(J_A, rcond=1e-12), J_A @ g)
    feasible = np.all(candidates @ unit.T >= -1e-12 * np.linalg.norm(g), axis=1)
    distance = np.where(feasible, np.linalg.norm(candidates - g, axis=1), np.inf)
    return candidates[np.argmin(distance)]


def project_agem(g: np.ndarray, J: np.ndarray, margin: float = 0.0) -> np.ndarray:
    g = np.asarray(g, dtype=np.float64)
    ref = np.asarray(J, dtype=np.float64).mean(axis=0)
    dot = ref @ g
    if dot >= 0:
        return g
    return g + max(margin, -dot / (ref @ ref)) * ref


def _best_kkt_point(K: np.ndarray, c: np.ndarray, rows_ge: np.ndarray) -> np.ndarray:
    """Brute force over active sets: ``min ½wᵀKw + cᵀw`` on the simplex with ``rows_ge w ≥ 0``.

    Every choice of variables held at 0 (eliminated, so that vertices and edges of the
    simplex are solved exactly) and of active rows of ``rows_ge`` is tried; its KKT system is
    solved by least squares, and among the feasible points the lowest objective wins (the
    problem is convex: the optimum is the stationary point of its own active set, and every
    other feasible point is no better; multipliers are not checked, since with dependent
    active rows least squares may return negative ones where non-negative ones exist).
    Exponential, for a handful of variables only. Solved in ``v = w ⊙ d / min d`` with
    ``d_t = sqrt(K_tt)``, so that gradients of very different norms are resolved alike
    (the substitution keeps every constraint's sign).
    """
    t = len(c)
    d = np.sqrt(np.clip(np.diag(K), 0, None))
    d[d <= 0] = 1.0
    a = d.min() / d  # w = a ⊙ v
    K = K * np.outer(a, a)
    c = c * a
    unit = max(float(np.max(np.diag(K))), 1e-300)
    K, c = K / unit, c / unit
    rows_ge = rows_ge * a[None, :]
    rows_ge = rows_ge / np.maximum(np.abs(rows_ge).max(axis=1, keepdims=True), 1e-300)
    best, best_v = np.inf, None
    for n_free in range(1, t + 1):
        for free in itertools.combinations(range(t), n_free):
            f = list(free)
            for r in range(len(rows_ge) + 1):
                for active in itertools.combinations(range(len(rows_ge)), r):
                    rows = np.vstack([a[None, f], rows_ge[list(active)][:, f]])
                    m = rows.shape[0]
                    system = np.block([[K[np.ix_(f, f)], -rows.T], [rows, np.zeros((m, m))]])
                    rhs = np.concatenate([-c[f], [1.0], np.zeros(m - 1)])
                    solution = np.linalg.lstsq(system, rhs, rcond=None)[0]
                    v = np.zeros(t)
                    v[f] = solution[:n_free]
                    scale = 1 + np.abs(rhs).max() + np.abs(solution).max()
                    if np.linalg.norm(system @ solution - rhs) > 1e-8 * scale:
                        continue
                    if np.any(v < -1e-8 * scale) or np.any(rows_ge @ v < -1e-8 * scale):
                        continue
                    value = float(0.5 * v @ K @ v + c @ v)
                    if value < best - 1e-12 * (abs(best) if np.isfinite(best) else 1):
                        best, best_v = value, v
    assert best_v is not None
    w = np.maximum(best_v * a, 0.0)  # its least-squares solves meet w ≥ 0 to ~1e-7 only
    return w / w.sum()


def min_norm(K: np.ndarray) -> np.ndarray:
    """MGDA's min-norm weights by brute force."""
    return _best_kkt_point(K, np.zeros(len(K)), np.zeros((0, len(K))))


def lfmlf(K: np.ndarray, c: np.ndarray) -> np.ndarray:
    """LF-MLF's Problem 2 by brute force."""
    return _best_kkt_point(K, c, K)


def pcgrad(grads: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """PCGrad on the vectors themselves: each g_i' projected off the original g_j it conflicts
    with, partners in ``orders[i]``; returns the per-objective results (T, p)."""
    out = grads.astype(np.float64).copy()
    for i in range(len(grads)):
        for j in orders[i]:
            dot = out[i] @ grads[j]
            if dot < 0 and grads[j] @ grads[j] > 0:
                out[i] -= dot / (grads[j] @ grads[j]) * grads[j]
    return out


def gradvac(
    grads: np.ndarray, targets: np.ndarray, orders: np.ndarray, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """GradVac as a loop over vectors (LibMTL's structure); returns (g', new targets)."""
    out = grads.astype(np.float64).copy()
    targets = targets.copy()
    for i in range(len(grads)):
        for j in orders[i]:
            norm_i, norm_j = np.linalg.norm(out[i]), np.linalg.norm(grads[j])
            if norm_i == 0 or norm_j == 0:
                continue
            phi = np.clip(out[i] @ grads[j] / (norm_i * norm_j), -1, 1)
            target = targets[i, j]
            if phi < target:
                root = np.sqrt(1 - target**2)
                out[i] += (
                    norm_i
                    * (target * np.sqrt(1 - phi**2) - phi * root)
                    / (norm_j * root)
                    * grads[j]
                )
            targets[i, j] = (1 - beta) * target + beta * phi
    return out, targets

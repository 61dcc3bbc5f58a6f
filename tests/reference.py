"""Independent float64 reference for the GEM projection: NNLS (Lawson-Hanson) in SciPy.

With ``u = v - m ≥ 0`` the dual ``min ½‖g + Jᵀv‖²  s.t.  v ≥ m`` is the non-negative least
squares problem ``min ‖Jᵀu − y‖  s.t.  u ≥ 0`` with ``y = −(g + m Jᵀ1)``; SciPy's ``nnls``
solves it on the full ``(p, t)`` matrix, sharing no code with the library's solvers.
"""

import itertools

import numpy as np
from scipy.optimize import nnls


def solve_dual(g: np.ndarray, J: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """``g + Jᵀv*`` for the dual's minimiser ``v* ≥ margin`` (whether or not g violates)."""
    g = np.asarray(g, dtype=np.float64)
    J = np.asarray(J, dtype=np.float64)
    base = g + margin * J.sum(axis=0)
    u, _ = nnls(J.T, -base, maxiter=50 * max(1, J.shape[0]))
    return base + J.T @ u


def project(g: np.ndarray, J: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """GEM's update: ``g`` if no constraint is violated, else :func:`solve_dual`."""
    g = np.asarray(g, dtype=np.float64)
    J = np.asarray(J, dtype=np.float64)
    if np.all(J @ g >= 0):
        return g
    return solve_dual(g, J, margin)


def project_agem(g: np.ndarray, J: np.ndarray, margin: float = 0.0) -> np.ndarray:
    g = np.asarray(g, dtype=np.float64)
    ref = np.asarray(J, dtype=np.float64).mean(axis=0)
    dot = ref @ g
    if dot >= 0:
        return g
    return g + max(margin, -dot / (ref @ ref)) * ref


def _best_kkt_point(K: np.ndarray, c: np.ndarray, constraints: np.ndarray) -> np.ndarray:
    """Brute force over active sets: ``min ½wᵀKw + cᵀw`` s.t. ``Σw = 1``, ``constraints w ≥ 0``.

    Every subset of the inequality rows is tried as the active set; its KKT system is solved
    by least squares, and among the points that are feasible with non-negative multipliers
    the lowest objective wins. Exponential, for a handful of variables only.
    """
    t = len(c)
    best, best_w = np.inf, None
    for r in range(len(constraints) + 1):
        for active in itertools.combinations(range(len(constraints)), r):
            rows = np.vstack([np.ones((1, t)), constraints[list(active)]])
            m = rows.shape[0]
            system = np.block([[K, -rows.T], [rows, np.zeros((m, m))]])
            rhs = np.concatenate([-c, [1.0], np.zeros(m - 1)])
            solution = np.linalg.lstsq(system, rhs, rcond=None)[0]
            w, multipliers = solution[:t], solution[t + 1 :]
            scale = 1 + np.abs(rhs).max() + np.abs(solution).max()
            if np.linalg.norm(system @ solution - rhs) > 1e-9 * scale:
                continue
            if np.any(constraints @ w < -1e-9 * scale) or np.any(multipliers < -1e-9 * scale):
                continue
            value = 0.5 * w @ K @ w + c @ w
            if value < best - 1e-12 * (1 + abs(best) if np.isfinite(best) else 1):
                best, best_w = value, w
    assert best_w is not None
    return best_w


def min_norm(K: np.ndarray) -> np.ndarray:
    """MGDA's min-norm weights by brute force."""
    return _best_kkt_point(K, np.zeros(len(K)), np.eye(len(K)))


def lfmlf(K: np.ndarray, c: np.ndarray) -> np.ndarray:
    """LF-MLF's Problem 2 by brute force."""
    return _best_kkt_point(K, c, np.vstack([np.eye(len(K)), K]))

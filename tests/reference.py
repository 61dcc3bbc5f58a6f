"""Independent float64 reference for the GEM projection: NNLS (Lawson-Hanson) in SciPy.

With ``u = v - m ≥ 0`` the dual ``min ½‖g + Jᵀv‖²  s.t.  v ≥ m`` is the non-negative least
squares problem ``min ‖Jᵀu − y‖  s.t.  u ≥ 0`` with ``y = −(g + m Jᵀ1)``; SciPy's ``nnls``
solves it on the full ``(p, t)`` matrix, sharing no code with the library's solvers.
"""

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

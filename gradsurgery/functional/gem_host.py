r"""GEM's dual and the reads of its check, on the host, for a Gram already there (the CPU).

:func:`multipliers` is :func:`gradsurgery.functional.gem_multipliers` on the NumPy view of
a float64 CPU Gram, with the solvers of :mod:`gradsurgery.qp_host`; :func:`read` is what
:func:`gradsurgery.functional.gem.check_solution` reads back from a step. Same quantities,
same algorithm as the torch code (rounding aside): only the cost of a small operation
changes, from a torch dispatch to a NumPy call.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from gradsurgery import qp, qp_host

__all__ = ["multipliers", "read"]


def multipliers(
    gram: np.ndarray, margin: float, mode: str, solver: str, eps: float
) -> tuple[np.ndarray, bool, float]:
    """``(v, violated, kkt_residual)`` of GEM's dual from the ``(t + 1, t + 1)`` Gram, ``t ≥ 1``.

    Options as for :func:`gradsurgery.functional.gem_multipliers` (checked by it).
    """
    b = gram[1:, 0]
    K = gram[1:, 1:]
    t = b.shape[0]
    resolved = qp.resolve_solver(solver, t) if mode == "gem" else "closed_form"  # may raise
    with np.errstate(all="ignore"):  # non-finite input is the caller's to report
        b_ref = b.sum() / t if mode == "agem" else None
        violated = bool(b_ref < 0) if b_ref is not None else bool((b < 0).any())
        if not violated:  # x = g: the device path solves anyway and discards the result
            return np.zeros(t), False, 0.0
        # the size of the terms of x = g + Jᵀv when every v_k sits at its bound m
        unit = math.sqrt(max(gram[0, 0], 0.0)) + margin * float(
            np.sqrt(np.maximum(K.diagonal(), 0.0)).sum()
        )
        if eps:
            K = K + eps * np.eye(t)
        if b_ref is not None:
            v, residual = qp_host.solve_quietly(
                (K.sum() / t**2).reshape(1, 1),
                b_ref.reshape(1),
                np.full(1, margin),
                "closed_form",
                unit,
            )
            return np.repeat(v / t, t), True, residual
        if qp.is_host_solver(resolved) and not np.isfinite(gram).all():
            return np.zeros(t), True, 0.0
        v, residual = qp_host.solve_quietly(K, b, np.full(t, margin), resolved, unit)
    return v, True, residual


def read(
    gram: np.ndarray, v: np.ndarray, violated: Tensor, kkt_residual: Tensor, threshold: float
) -> tuple[bool, bool, float, bool, float]:
    """``(finite, violated, kkt_residual, tiny, bound)`` of a step, as the check reads them.

    ``tiny``: a diagonal entry of ``gram`` is below ``threshold``
    (:func:`gradsurgery.gram.underflow_suspected`); ``bound``: ``‖g‖ + Σ_k |v_k| ‖g_k‖``
    (infinite when ``gram`` is not finite).
    """
    finite = bool(np.isfinite(gram).all())
    diagonal = gram.diagonal()
    tiny = bool((diagonal < threshold).any())
    bound = math.inf
    if finite:
        norms = np.sqrt(np.maximum(diagonal, 0.0))
        bound = float(norms[0] + (np.abs(v) * norms[1:]).sum())
    return finite, bool(violated), float(kkt_residual), tiny, bound

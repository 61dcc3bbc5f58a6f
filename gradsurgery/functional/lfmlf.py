r"""LF-MLF: less-forgetting multi-lingual fine-tuning (Mao et al., 2022).

With the ``T`` source-language gradients as rows of :math:`J` and the sum
:math:`\bar g = \sum_{i<k} d_i` of all previous update directions (:math:`\bar g = 0` at
the first step), each step solves Problem 2 of the paper in ``T`` variables:

.. math::

    \min_w \tfrac12 w^\top K w + w^\top c \quad \text{s.t.} \quad K w \ge 0,\;
    \textstyle\sum_t w_t = 1,\; w \ge 0, \qquad K = J J^\top,\ c = J \bar g,

that is :math:`\min \lVert \bar g + J^\top w \rVert` over the common descent directions in
the convex hull of the gradients: the update that keeps the model closest to the
pre-trained one (an upper bound of forgetting, Theorem 1) while not increasing any
language's loss to first order. Then :math:`d = J^\top w` and :math:`\bar g \leftarrow \bar g + d`.

The feasible set is never empty: MGDA's min-norm point satisfies
:math:`K w \ge \lVert J^\top w \rVert^2 \ge 0`. It only shrinks to directions of norm zero
at a Pareto-stationary point, which is what the paper's "feasible set is empty" detects;
the wrapper detects that through the min-norm point itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurgery import gram, qp, simplex_qp
from gradsurgery.errors import NonFiniteGradientError
from gradsurgery.functional.validation import check_gradients, check_no_autograd, finite_gram

__all__ = ["DEFAULT_SOLVER", "lfmlf_weights"]

DEFAULT_SOLVER = "daqp"


def lfmlf_weights(
    grads: Tensor, accumulated: Tensor | None = None, solver: str | None = None
) -> Tensor:
    """Weights ``w`` solving LF-MLF's Problem 2 for the ``(T, p)`` gradients.

    Args:
        grads: one row per objective (source language).
        accumulated: ``ḡ``, the sum of the previous combined directions, shape ``(p,)``;
            ``None`` at the first step (``c = 0``).
        solver: qpsolvers backend (default ``"daqp"``).

    Returns:
        ``w`` (float64, on ``grads``' device); the direction is ``d = gradsᵀ w``.

    Raises:
        ValueError: shapes, devices or solver that do not fit, or ``grads`` or
            ``accumulated`` requiring grad while grad mode is on (not differentiable: pass
            them detached).
        NonFiniteGradientError: a row of ``grads`` or ``accumulated`` is not finite, or
            their inner products overflow ``grads``' dtype.
        SolverError: the QP was not solved to a KKT residual of 1e-6.
    """
    check_no_autograd("lfmlf_weights", grads=grads, accumulated=accumulated)
    K = finite_gram(grads, "lfmlf_weights")
    if accumulated is None:
        c = torch.zeros_like(K[0])
    else:
        if accumulated.shape != grads.shape[1:] or accumulated.device != grads.device:
            raise ValueError(
                f"accumulated must have shape {tuple(grads.shape[1:])} on {grads.device}, got "
                f"{tuple(accumulated.shape)} on {accumulated.device}"
            )
        c = gram.cross(grads, accumulated.to(grads.dtype))
        if not bool(c.isfinite().all()):  # NaN/Inf in ḡ always shows in c (0·Inf is NaN)
            check_gradients(accumulated.unsqueeze(0), "lfmlf_weights")
            raise NonFiniteGradientError(
                "lfmlf_weights: the inner products of grads with accumulated overflow "
                f"{grads.dtype}; pass them in float64 (grads.double(), accumulated.double())"
            )
    solution = simplex_qp.lfmlf_qp(K, c, solver or DEFAULT_SOLVER)
    tolerance = qp.kkt_tolerance(grads.shape[0], [grads.dtype])
    simplex_qp.raise_if_inexact(solution, "LF-MLF's Problem 2", tolerance)
    return solution.w

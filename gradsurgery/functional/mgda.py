r"""MGDA: the min-norm point of the convex hull of the gradients (Sener & Koltun, 2018).

.. math::

    w^* = \arg\min_{w \in \Delta_T} \tfrac12 \Big\lVert \sum_t w_t g_t \Big\rVert^2,
    \qquad d = J^\top w^* .

At the optimum :math:`\langle d, g_t \rangle \ge \lVert d \rVert^2` for every ``t``: ``d``
is a descent direction common to all objectives, or zero at a Pareto-stationary point.
"""

from __future__ import annotations

from torch import Tensor

from gradsurgery import gram, simplex_qp
from gradsurgery.functional.validation import check_gradients

__all__ = ["mgda_weights"]


def mgda_weights(grads: Tensor, solver: str = "auto") -> Tensor:
    """MGDA's weights for the ``(T, p)`` gradients ``grads`` (float64, on their device).

    ``solver``: ``"auto"``, ``"enumerate"`` (on the device, no host synchronisation) or a
    qpsolvers backend; see :func:`gradsurgery.simplex_qp.min_norm_weights`. Not
    differentiable: ``grads`` that require grad while grad mode is on are refused
    (``ValueError``); pass ``grads.detach()``.
    """
    check_gradients(grads, "mgda_weights")
    return simplex_qp.min_norm_weights(gram.gram(grads), solver).w

r"""PCGrad: project conflicting gradients (Yu et al., 2020).

For each objective :math:`i`, in a random order of the others :math:`j`:

.. math::

    g_i' \leftarrow g_i' - \frac{\min(\langle g_i', g_j \rangle, 0)}{\lVert g_j \rVert^2} g_j,

always against the *original* :math:`g_j`; then :math:`d = \sum_i g_i'` (``"sum"``, as in
the paper) or :math:`\tfrac1T \sum_i g_i'` (``"mean"``).

Every :math:`g_i'` stays a combination :math:`\sum_k C_{ik} g_k` of the original gradients,
so the whole procedure runs on the ``T × T`` Gram matrix: ``T − 1`` rounds of a few small
tensor operations, each round treating all objectives at once, with no host
synchronisation; the full-size gradients are read once for the Gram and once for
:math:`d = J^\top w`, :math:`w = \sum_i C_i`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurgery.functional.validation import check_reduction, finite_gram

__all__ = ["conflict_orders", "pcgrad_coefficients", "pcgrad_weights"]


def conflict_orders(t: int, generator: torch.Generator | None = None) -> Tensor:
    """For each objective ``i``, a random order of the others: a ``(t, t − 1)`` CPU tensor.

    Drawn from ``generator`` (a CPU ``torch.Generator``; the global one if None) with one
    call, so a seeded generator gives reproducible orders.
    """
    keys = torch.rand(t, t, generator=generator, dtype=torch.float64)
    keys.fill_diagonal_(float("inf"))
    return keys.argsort(dim=1)[:, : t - 1]


def pcgrad_coefficients(K: Tensor, orders: Tensor) -> Tensor:
    """``C`` with ``g_i' = Σ_k C_ik g_k`` after PCGrad, from the Gram ``K`` and the orders."""
    t = K.shape[0]
    C = torch.eye(t, dtype=K.dtype, device=K.device)
    orders = orders.to(K.device, non_blocking=True)
    norms = K.diagonal()
    for step in range(t - 1):
        partner = orders[:, step : step + 1]
        dots = (C @ K).gather(1, partner)
        partner_norms = norms[partner]
        conflict = (dots < 0) & (partner_norms > 0)
        shift = torch.where(conflict, dots / partner_norms.clamp(min=torch.finfo(K.dtype).tiny), 0)
        C.scatter_add_(1, partner, -shift)
    return C


def pcgrad_weights(
    grads: Tensor, generator: torch.Generator | None = None, reduction: str = "sum"
) -> Tensor:
    """PCGrad's combination of the ``(T, p)`` gradients as weights: ``d = gradsᵀ w``.

    Not differentiable: ``grads`` that require grad while grad mode is on are refused
    (``ValueError``); pass ``grads.detach()``.
    """
    check_reduction(reduction)
    K = finite_gram(grads, "pcgrad_weights")
    C = pcgrad_coefficients(K, conflict_orders(grads.shape[0], generator))
    weights = C.sum(dim=0)
    return weights / grads.shape[0] if reduction == "mean" else weights

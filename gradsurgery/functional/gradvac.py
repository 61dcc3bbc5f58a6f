r"""GradVac: gradient vaccine (Wang et al., 2021).

GradVac keeps, for every ordered pair of objectives, an exponential moving average
:math:`\hat\phi_{ij}` of their gradients' cosine similarity (initialised to 0). For each
objective :math:`i`, in a random order of the others :math:`j`, with
:math:`\phi = \cos(g_i', g_j)`:

.. math::

    \text{if } \phi < \hat\phi_{ij}: \quad
    g_i' \leftarrow g_i' + \frac{\lVert g_i' \rVert \big(\hat\phi_{ij}\sqrt{1-\phi^2}
    - \phi\sqrt{1-\hat\phi_{ij}^2}\big)}{\lVert g_j \rVert \sqrt{1-\hat\phi_{ij}^2}}\, g_j,
    \qquad \hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi,

which raises the cosine of :math:`g_i'` and :math:`g_j` exactly to the target; then
:math:`d = \sum_i g_i'`. Like PCGrad it runs on the Gram matrix (``T − 1`` rounds, all
objectives at once, no host synchronisation). With per-parameter granularity every
parameter tensor has its own Gram matrix, targets and combination weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradsurgery.functional.pcgrad import conflict_orders
from gradsurgery.functional.validation import check_no_autograd, finite_gram

__all__ = ["check_beta", "gradvac_coefficients", "gradvac_weights", "near_parallel"]

_FP32_DIGITS_HALVED = math.sqrt(torch.finfo(torch.float32).eps)


def near_parallel(K: Tensor) -> Tensor:
    r"""0-d bool: whether two gradients are nearly parallel or opposite, to fp32's precision.

    Then an fp32-accumulated Gram loses half its digits in GradVac's
    :math:`\sqrt{1 - \phi^2}`:
    :math:`1 - \cos^2 = (K_{ii}K_{jj} - K_{ij}^2) / (K_{ii}K_{jj})` carries the Gram's
    rounding (about :math:`arepsilon_{32}`) unreduced; below
    :math:`\sqrt{arepsilon_{32}}` the square root has lost more digits than a float32
    loop over the vectors would (that loop's cosine rounds to exactly ±1 there).
    """
    diagonal = K.diagonal().clamp(min=0)
    scale = diagonal[:, None] * diagonal[None, :]
    sine2 = (scale - K**2) / torch.where(scale > 0, scale, 1)
    off = ~torch.eye(K.shape[0], dtype=torch.bool, device=K.device) & (scale > 0)
    return (off & (sine2 < _FP32_DIGITS_HALVED)).any()


def check_beta(beta: float) -> None:
    """Raise unless ``0 < beta ≤ 1``."""
    if not (math.isfinite(beta) and 0 < beta <= 1):
        raise ValueError(f"beta must be in (0, 1], got {beta}")


def gradvac_coefficients(
    K: Tensor, targets: Tensor, orders: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """``C`` (``g_i' = Σ_k C_ik g_k``) and the updated targets, batched over leading dims.

    Args:
        K: ``(..., T, T)`` Gram matrices (one per parameter tensor, or one).
        targets: ``(..., T, T)`` EMA cosine targets ``φ̂_ij``.
        orders: ``(T, T − 1)`` order of partners per objective (shared by the batch).
        beta: EMA rate.
    """
    t = K.shape[-1]
    tiny = torch.finfo(K.dtype).tiny
    C = torch.eye(t, dtype=K.dtype, device=K.device).expand_as(K).clone()
    targets = targets.clone()
    orders = orders.to(K.device, non_blocking=True)
    partner_norms_all = K.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    for step in range(t - 1):
        partner = orders[:, step : step + 1].expand(*K.shape[:-2], t, 1)
        CK = C @ K
        dots = CK.gather(-1, partner).squeeze(-1)
        own = (CK * C).sum(dim=-1).clamp(min=0).sqrt()
        other = partner_norms_all.gather(-1, partner.squeeze(-1))
        valid = (own > 0) & (other > 0)
        phi = torch.where(valid, dots / (own * other).clamp(min=tiny), 0).clamp(-1, 1)
        target = targets.gather(-1, partner).squeeze(-1)
        root = (1 - target**2).clamp(min=tiny).sqrt()
        shift = own * (target * (1 - phi**2).sqrt() - phi * root) / (other.clamp(min=tiny) * root)
        shift = torch.where(valid & (phi < target), shift, 0)
        C.scatter_add_(-1, partner, shift.unsqueeze(-1))
        updated = torch.where(valid, (1 - beta) * target + beta * phi, target)
        targets.scatter_(-1, partner, updated.unsqueeze(-1))
    return C, targets


def gradvac_weights(
    grads: Tensor,
    targets: Tensor | None = None,
    beta: float = 1e-2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """GradVac's combination of the ``(T, p)`` gradients (whole-model granularity).

    Not differentiable: ``grads`` or ``targets`` that require grad while grad mode is on
    are refused (``ValueError``); pass them detached. Nearly parallel or opposite
    low-precision gradients (:func:`near_parallel`) get the float64 Gram of
    :func:`gradsurgery.gram.exact_gram` (two more passes over them).

    Returns:
        The weights ``w`` (``d = gradsᵀ w``) and the updated ``(T, T)`` targets to pass to
        the next call (start with ``None``: all zero).
    """
    check_no_autograd("gradvac_weights", grads=grads, targets=targets)
    check_beta(beta)
    t = grads.shape[0]
    K = finite_gram(grads, "gradvac_weights", too_coarse=near_parallel)
    if targets is None:
        targets = torch.zeros_like(K)
    elif targets.shape != K.shape:
        raise ValueError(f"targets must have shape {tuple(K.shape)}, got {tuple(targets.shape)}")
    C, targets = gradvac_coefficients(K, targets.to(K), conflict_orders(t, generator), beta)
    return C.sum(dim=0), targets

r"""MGDA: the min-norm point of the convex hull of the gradients (Sener & Koltun, 2018).

.. math::

    w^* = \arg\min_{w \in \Delta_T} \tfrac12 \Big\lVert \sum_t w_t g_t \Big\rVert^2,
    \qquad d = J^\top w^* .

At the optimum :math:`\langle d, g_t \rangle \ge \lVert d \rVert^2` for every ``t``: ``d``
is a descent direction common to all objectives, or zero at a Pareto-stationary point.

Gradient normalisation (the authors' code, not the paper's algorithm; LibMTL offers it as
``mgda_gn``) solves the problem for :math:`\hat g_t = g_t / n_t` instead, with
:math:`n_t = 1` (``"none"``), :math:`\lVert g_t \rVert` (``"l2"``), the loss
:math:`L_t` (``"loss"``) or :math:`L_t \lVert g_t \rVert` (``"loss+"``), and steps along
:math:`d = \sum_t w^*_t \hat g_t`: the weights of the original gradients are
:math:`w^*_t / n_t`. Each :math:`g_t` is only scaled by a positive number, so ``d`` stays a
common descent direction. Everything runs on the Gram matrix:
:math:`\hat K = K / (n n^\top)`, no pass over the gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gradsurgery import simplex_qp
from gradsurgery.functional.validation import check_no_autograd, finite_gram

__all__ = [
    "DEFAULT_NORMALIZATION",
    "NORMALIZATIONS",
    "Normalization",
    "check_normalization",
    "mgda_weights",
    "normalize_gram",
]

Normalization = Literal["none", "l2", "loss", "loss+"]
NORMALIZATIONS = ("none", "l2", "loss", "loss+")
DEFAULT_NORMALIZATION: Normalization = "none"
"""The paper's algorithm (Sener & Koltun, 2018) normalises nothing; LibMTL's default too."""


def check_normalization(normalization: str) -> None:
    """Raise ``ValueError`` unless ``normalization`` is one of ``NORMALIZATIONS``."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def _normalizers(K: Tensor, normalization: str, losses: Tensor | None) -> Tensor:
    """``n_t`` (float64, ``K``'s device); a zero gradient keeps ``n_t = 1``."""
    t = K.shape[0]
    norms = K.diagonal().clamp(min=0).sqrt()
    if normalization in ("none", "l2"):
        n = norms if normalization == "l2" else torch.ones_like(norms)
    else:
        if losses is None:
            raise ValueError(
                f"normalization={normalization!r} divides by the losses: pass losses= "
                "(one per objective), or use 'none' or 'l2'"
            )
        if losses.shape != (t,) or losses.device != K.device:
            raise ValueError(
                f"losses must have shape ({t},) on {K.device}, got {tuple(losses.shape)} on "
                f"{losses.device}"
            )
        values = losses.detach().to(torch.float64)
        if not bool(((values > 0) & values.isfinite()).all()):
            raise ValueError(
                f"normalization={normalization!r} needs finite losses > 0, got "
                f"{values.tolist()}; use 'l2' or 'none' for losses that can be ≤ 0"
            )
        n = values if normalization == "loss" else values * norms
    return torch.where(n > 0, n, torch.ones_like(n))


def normalize_gram(
    K: Tensor, normalization: str = DEFAULT_NORMALIZATION, losses: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The Gram ``K̂ = K / (n nᵀ)`` of the normalised gradients, and ``n``.

    MGDA's weights of the original gradients are then ``ŵ / n``, ``ŵ`` the min-norm point
    of ``K̂``. With ``"none"``: ``K`` itself and ``None`` (nothing to divide).

    Raises:
        ValueError: an unknown normalisation, or losses missing, misshapen, ≤ 0 or not
            finite where the normalisation divides by them (one host read).
    """
    check_normalization(normalization)
    if normalization == "none":
        return K, None
    n = _normalizers(K, normalization, losses)
    return K / (n[:, None] * n[None, :]), n


def mgda_weights(
    grads: Tensor,
    solver: str = "auto",
    *,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    losses: Tensor | None = None,
) -> Tensor:
    """MGDA's weights for the ``(T, p)`` gradients ``grads`` (float64, on their device).

    Args:
        grads: one row per objective.
        solver: ``"auto"``, ``"enumerate"`` (on the device, no host synchronisation) or a
            qpsolvers backend; see :func:`gradsurgery.simplex_qp.min_norm_weights`.
        normalization: ``"none"`` (default, the paper), ``"l2"``, ``"loss"`` or
            ``"loss+"``: see the module. ``d = gradsᵀ w`` either way.
        losses: ``(T,)`` the objectives' losses, needed by ``"loss"`` and ``"loss+"``
            (finite and > 0).

    Raises:
        ValueError: shapes, options or losses that do not fit, or ``grads`` requiring grad
            while grad mode is on (not differentiable: pass ``grads.detach()``).
        NonFiniteGradientError: a row of ``grads`` holds NaN or Inf.
    """
    check_normalization(normalization)
    check_no_autograd("mgda_weights", grads=grads)
    K, n = normalize_gram(finite_gram(grads, "mgda_weights"), normalization, losses)
    w = simplex_qp.min_norm_point(K, solver)
    return w if n is None else w / n

"""Checks shared by the functional forms of the multi-objective methods."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurgery.errors import NonFiniteGradientError

__all__ = ["check_gradients", "check_reduction"]


def check_gradients(grads: Tensor) -> None:
    """Raise unless ``grads`` is a finite floating ``(T, p)`` matrix with ``T ≥ 1``."""
    if grads.dim() != 2 or grads.shape[0] == 0:
        raise ValueError(
            f"grads must be a (T, p) matrix with one row per objective and T ≥ 1, got shape "
            f"{tuple(grads.shape)}"
        )
    if not grads.is_floating_point():
        raise ValueError(f"grads must be floating point, got {grads.dtype}")
    finite = torch.isfinite(grads).all(dim=1)
    if not bool(finite.all()):
        rows = [int(i) for i in torch.nonzero(~finite).flatten()]
        raise NonFiniteGradientError(f"gradient rows {rows} hold NaN or Inf values")


def check_reduction(reduction: str) -> None:
    """Raise unless ``reduction`` is ``"sum"`` or ``"mean"``."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")

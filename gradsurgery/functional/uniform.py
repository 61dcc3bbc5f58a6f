r"""Uniform weighting: :math:`d = \tfrac1T \sum_t g_t` (Uniform-MLF in Mao et al., 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurgery.functional.validation import check_gradients

__all__ = ["uniform_weights"]


def uniform_weights(grads: Tensor) -> Tensor:
    """Weights ``1/T`` for the ``T`` rows of ``grads`` (float64, on ``grads``' device).

    Like every functional form, refuses ``grads`` that require grad while grad mode is on
    (``ValueError``): pass ``grads.detach()``.
    """
    check_gradients(grads, "uniform_weights")
    t = grads.shape[0]
    return torch.full((t,), 1.0 / t, dtype=torch.float64, device=grads.device)

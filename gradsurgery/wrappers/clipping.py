r"""Gradient clipping after the surgery: ``max_grad_norm=`` of every gradient surgery.

``torch.nn.utils.clip_grad_norm_`` called before ``opt.step()`` would clip the task
gradient, which the surgery then rewrites; the option clips the rewritten gradient ``x``
instead, just before the inner optimizer steps, as ``clip_grad_norm_`` does:

.. math::

    x \leftarrow x \cdot \min\!\left(1, \frac{c}{\lVert x \rVert_2 + 10^{-6}}\right)

with ``c = max_grad_norm`` and the norm taken over every parameter of the wrapper (across
ranks when the gradients are sharded). Scaling by a positive number keeps every guarantee
of the surgery that is a sign (``⟨x, g_k⟩ ≥ 0``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradsurgery.distributed import Distributed
from gradsurgery.flat import GradientBank

__all__ = ["check_max_grad_norm", "clip_"]

EPS = 1e-6
"""Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does."""


def check_max_grad_norm(max_grad_norm: float | None) -> float | None:
    """``max_grad_norm`` as a float, or ``None`` (no clipping).

    Raises:
        TypeError: not a real number nor ``None``.
        ValueError: not finite and positive.
    """
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(
            f"max_grad_norm must be a positive number or None, got {type(max_grad_norm).__name__}"
        )
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(
            f"max_grad_norm must be a positive finite number, got {max_grad_norm!r}; "
            "pass None for no clipping"
        )
    return float(max_grad_norm)


def clip_(bank: GradientBank, max_norm: float, distributed: Distributed | None) -> Tensor:
    """Scale row 0 of ``bank`` in place so that its 2-norm is at most ``max_norm``.

    The squared norm is accumulated in at least fp32 per dtype block (no copy of the
    gradient) and summed over the shards when the gradients are sharded; nothing is read
    back to the host.

    Returns:
        The norm before clipping, a 0-d float tensor on the bank's device.
    """
    squares = [
        torch.linalg.vector_norm(
            block[0], dtype=torch.promote_types(block.dtype, torch.float32)
        ).square()
        for block in bank.blocks
    ]
    square = torch.stack([s.to(torch.float64) for s in squares]).sum().reshape(1, 1)
    if distributed is not None:  # the squared norm is row 0's entry of the Gram matrix
        square = distributed.reduce_gram(square)
    norm = square.reshape(()).sqrt()
    coefficient = (max_norm / (norm + EPS)).clamp(max=1.0)
    for block in bank.blocks:
        block[0].mul_(coefficient)
    return norm.to(torch.float32)

r"""Whether writing a combination of the bank's rows into ``.grad`` overflows its dtype.

A step writes :math:`x = \sum_k w_k g_k` (plus :math:`g` for GEM) into row 0. Finite rows
can still give an infinite :math:`x`: in fp16, :math:`g = (6\cdot10^4, 6\cdot10^4)` and
:math:`g_1 = (1, -3)` project to :math:`(\infty, 24000)`. Every entry of :math:`x`, and
every partial sum of the matrix-vector product that computes it, is bounded by

.. math::

    \lvert x_i \rvert \le \sum_k \lvert w_k \rvert \, \lVert g_k \rVert
    = \sum_k \lvert w_k \rvert \sqrt{G_{kk}},

read off the Gram matrix :math:`G` the step has already computed. When the bound is below
the largest finite value of every block's dtype nothing can overflow, and no pass over
the gradients is needed. In fp32 and fp64 the Gram matrix is accumulated in the rows' own
precision, so a finite Gram means :math:`\lVert g_k \rVert < \sqrt{\text{max}}` and only
weights beyond :math:`\sqrt{\text{max}}` (about :math:`1.8\cdot10^{19}` in fp32) can fail
the bound; in fp16 any gradient of norm above 65504 may. Only then is the combination
computed without writing it (:func:`gradsurgery.gram.combine_overflows`), one extra pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurgery import gram as _gram
from gradsurgery.distributed import Rows
from gradsurgery.errors import NonFiniteGradientError

__all__ = [
    "bound",
    "combine_overflows",
    "error",
    "limit",
    "non_finite_error",
    "norms",
    "row0_finite",
]


def limit(bank: Rows) -> float:
    """The largest finite value of the smallest dtype among the bank's blocks."""
    return min(torch.finfo(block.dtype).max for block in bank.blocks)


def norms(gram: Tensor) -> Tensor:
    """The rows' norms ``√G_kk`` (batched over leading dims)."""
    return gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()


def bound(gram: Tensor, weights: Tensor) -> Tensor:
    r"""``Σ_k |w_k| √G_kk``, batched over leading dims of ``gram`` (the largest is returned)."""
    return (weights.abs() * norms(gram)).sum(dim=-1).max()


def combine_overflows(bank: Rows, weights: Tensor, rows: slice) -> Tensor:
    """0-d bool: whether ``row0 + Σ_k w_k row_k`` over ``rows`` overflows (writes nothing)."""
    flags = [
        _gram.combine_overflows(block[0], block[rows], weights, accumulate=True)
        for block in bank.blocks
    ]
    return torch.stack(flags).any()


def row0_finite(bank: Rows) -> bool:
    """Whether row 0 holds only finite values (a pass over it; reads one flag back)."""
    return bool(torch.stack([block[0].isfinite().all() for block in bank.blocks]).all())


def error(bank: Rows) -> NonFiniteGradientError:
    """The error of a step whose rewritten gradient would overflow."""
    dtypes = ", ".join(str(block.dtype).removeprefix("torch.") for block in bank.blocks)
    return NonFiniteGradientError(
        f"the rewritten gradient overflows the parameters' dtype ({dtypes}): an entry would "
        "be Inf although every gradient is finite; nothing was changed. Keep the parameters "
        "in fp32 (autocast computes in fp16 without fp16 parameters) or scale the losses "
        "down, or pass a GradScaler to skip such steps"
    )


def non_finite_error() -> NonFiniteGradientError:
    """The error of a step whose gradients hold NaN or Inf values."""
    return NonFiniteGradientError(
        "a gradient holds NaN or Inf values (or its squared norm overflows); "
        "nothing was changed. Check this step's losses, or pass a GradScaler to "
        "skip such steps"
    )

"""Per-parameter Gram matrices and combinations over a block of stacked gradient rows.

Per-tensor methods (GradVac at ``granularity="parameter"``) need, for every parameter
tensor ``s`` (a segment of consecutive columns of the ``(r, n)`` block ``B``),

* :func:`segment_gram` -- ``G_s = B_s B_sᵀ``, and
* :func:`combine_segments_` -- ``out_s ← B_sᵀ w_s`` with weights of its own.

On the CPU the compiled kernels of :mod:`gradsurgery.kernels` compute both, segment by
segment, when Numba is installed. Otherwise both walk the block in *pieces*: the segments
cut at every multiple of ``columns`` (:data:`COLUMNS` by default), so each matrix product
is cache-sized, the temporaries are ``r × r`` per piece (nothing proportional to ``n``),
and the number of Python-level operations is ``n / columns`` plus the number of
parameters. The pieces are planned once per layout, from the parameters' sizes on the
host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from gradsurgery import kernels
from gradsurgery.gram import compute_dtype, ieee_fp32_matmul

__all__ = ["COLUMNS", "Segments", "combine_segments_", "segment_gram"]

COLUMNS = 1 << 16


class Segments:
    """Consecutive column segments of the given lengths, as pieces of at most ``columns``.

    A segment may be empty (a parameter with no entries in this process's shard): its Gram
    matrix is zero and it has no pieces.

    Attributes:
        count: the number of segments.
        bounds: ``(count + 1,)`` int64 array: segment ``s`` is columns ``bounds[s]`` to
            ``bounds[s + 1]``.
        pieces: ``(columns, segment)`` for each piece, in column order.
        owner: ``(len(pieces),)`` long tensor on ``device``: each piece's segment.
    """

    def __init__(
        self, lengths: Sequence[int], device: torch.device, columns: int = COLUMNS
    ) -> None:
        if any(length < 0 for length in lengths):
            raise ValueError(f"segment lengths must be non-negative, got {list(lengths)}")
        if columns <= 0:
            raise ValueError(f"columns per piece must be positive, got {columns}")
        self.count = len(lengths)
        self.bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.pieces: list[tuple[slice, int]] = []
        start = 0
        for segment, length in enumerate(lengths):
            end = start + length
            while start < end:
                cut = min(end, (start // columns + 1) * columns)
                self.pieces.append((slice(start, cut), segment))
                start = cut
        self.owner = torch.tensor([s for _, s in self.pieces], dtype=torch.long, device=device)


def segment_gram(block: Tensor, segments: Segments) -> Tensor:
    """``(segments.count, r, r)`` float64: the Gram matrix of each segment of ``block``."""
    if kernels.supports(block):
        return kernels.segment_gram(block, segments.bounds)
    rows = block.shape[0]
    dtype = compute_dtype(block.dtype)
    partial = torch.empty(len(segments.pieces), rows, rows, dtype=dtype, device=block.device)
    with ieee_fp32_matmul():
        for i, (columns, _) in enumerate(segments.pieces):
            piece = block[:, columns].to(dtype)
            torch.mm(piece, piece.T, out=partial[i])
    out = torch.zeros(segments.count, rows, rows, dtype=torch.float64, device=block.device)
    return out.index_add_(0, segments.owner, partial.double())


def combine_segments_(out: Tensor, block: Tensor, weights: Tensor, segments: Segments) -> Tensor:
    """Write ``out[segment s] ← Σ_k weights[s, k] · block[k, segment s]``; return ``out``."""
    if kernels.supports(block, out):
        kernels.combine_segments_(out, block, weights, segments.bounds)
        return out
    dtype = compute_dtype(block.dtype)
    weights = weights.to(dtype)
    with ieee_fp32_matmul():
        for columns, segment in segments.pieces:
            piece = block[:, columns]
            if piece.dtype == dtype:
                torch.mv(piece.T, weights[segment], out=out[columns])
            else:
                out[columns] = piece.to(dtype).T @ weights[segment]
    return out

"""Inner products and row combinations of stacked gradients, accumulated in at least fp32.

Everything a gradient-surgery step reads from the full-size gradients goes through two
operations on a ``(r, n)`` block of stacked gradient rows:

* :func:`gram` -- ``G = B Bᵀ`` (one matrix product, returned in float64), and
* :func:`combine_` -- ``out ← β·out + Bᵀ w`` (a matrix-vector product, written in place).

On the CPU, the compiled kernels of :mod:`gradsurgery.kernels` (with Numba installed) compute
the Gram and the combination of fp32, fp64 and bf16 blocks at about the speed of reading
the rows; what follows is how PyTorch computes them otherwise, and on accelerators.
fp32 and fp64 blocks use one BLAS call each, with TF32 (or bf16 emulation on the CPU)
switched off for the call even when the user enabled it globally: a Gram in TF32 carries
only ~3 significant digits. fp16 and bf16 blocks are processed in chunks that are upcast to
fp32, so the dot products and the combination are exact to fp32 and only the final write
rounds to the gradient's own dtype. Each chunk is upcast into one reused fp32 buffer of
``r · CHUNK`` values on accelerators (large chunks: few kernel launches) and ``r ·
CPU_CHUNK`` on the CPU (1 MiB of fp32 per row, about a core's L2 cache: smaller chunks
cost more in per-call overhead than they save, measured 1.6× slower at ``2¹⁶`` columns,
and a fresh large buffer per chunk costs more in page faults than the arithmetic);
either way independent of the model size.

Gradients so small that their squares leave the range of the accumulation dtype (fp32
gradients below about 1e-19) underflow in the Gram; above about 1e19 they overflow it.
:func:`underflow_suspected` tells from the Gram alone (no pass over the gradients) when
underflow may have happened, and :func:`exact_gram` then recomputes it from rows rescaled
by powers of two, at the cost of two more passes that the normal case never makes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from gradsurgery import kernels

__all__ = [
    "CHUNK",
    "CPU_CHUNK",
    "combine_",
    "combine_checked_",
    "combine_overflows",
    "compute_dtype",
    "cross",
    "exact_gram",
    "gram",
    "ieee_fp32_matmul",
    "is_exact",
    "underflow_suspected",
    "underflow_threshold",
]

CHUNK = 1 << 22
CPU_CHUNK = 1 << 18
_CPU_BLOCK = 4096
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_MATMUL_BACKENDS = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)  # type: ignore[attr-defined]


@contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """Run fp32 matrix products in full IEEE fp32 (no TF32, no bf16 emulation) inside."""
    saved = [backend.fp32_precision for backend in _MATMUL_BACKENDS]
    for backend in _MATMUL_BACKENDS:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, precision in zip(_MATMUL_BACKENDS, saved, strict=True):
            backend.fp32_precision = precision


def _upcast_chunks(block: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """Column slices of a low-precision ``block`` and their fp32 copies, in one reused buffer."""
    rows, n = block.shape
    width = CPU_CHUNK if block.device.type == "cpu" else CHUNK
    buffer = torch.empty(rows, min(width, n), dtype=torch.float32, device=block.device)
    for start in range(0, n, width):
        part = slice(start, min(start + width, n))
        chunk = buffer[:, : part.stop - start]
        chunk.copy_(block[:, part])
        yield part, chunk


def _full_precision_gram(block: Tensor) -> Tensor:
    if block.device.type != "cpu":
        return block @ block.T
    # CPU BLAS is slow on a (r, n) x (n, r) product with tiny r and huge n (measured 3-5x
    # off the memory bound); a batch of cache-sized (r, BLOCK) products is not, and its
    # blockwise summation is also more accurate.
    rows, n = block.shape
    if n < 2 * _CPU_BLOCK:
        return block @ block.T
    whole = n - n % _CPU_BLOCK
    tiles = block[:, :whole].view(rows, whole // _CPU_BLOCK, _CPU_BLOCK).transpose(0, 1)
    total = torch.bmm(tiles, tiles.transpose(1, 2)).sum(dim=0)
    tail = block[:, whole:]
    return total + tail @ tail.T


def gram(block: Tensor) -> Tensor:
    """Return ``block @ block.T`` in float64 for a 2-D ``block`` of stacked rows.

    The result is exactly symmetric (BLAS may sum ``(i, j)`` and ``(j, i)`` in different
    orders; the two are averaged).
    """
    if kernels.supports(block):
        return kernels.gram(block)
    rows = block.shape[0]
    with ieee_fp32_matmul():
        if block.dtype not in _LOW_PRECISION:
            acc = _full_precision_gram(block).double()
        else:
            acc = torch.zeros(rows, rows, dtype=torch.float64, device=block.device)
            for _, chunk in _upcast_chunks(block):
                acc += _full_precision_gram(chunk)
    return (acc + acc.T) / 2


def underflow_suspected(gram: Tensor, n: int, dtypes: Iterable[torch.dtype]) -> Tensor:
    r"""0-d bool: whether a Gram of ``n``-column rows may have lost values to underflow.

    A dot product of ``n`` terms accumulated in a dtype with smallest normal number
    :math:`\tau` and machine epsilon :math:`\varepsilon` loses at most about
    :math:`n \tau \varepsilon` to underflow. It is suspected when a diagonal entry (a
    squared norm) is below :math:`n \tau / \varepsilon`, where that loss could matter; a
    zero row is suspected too, since a row of tiny values may have summed to zero.
    """
    return (gram.diagonal() < underflow_threshold(n, dtypes)).any()


def underflow_threshold(n: int, dtypes: Iterable[torch.dtype]) -> float:
    """The squared norm below which :func:`underflow_suspected` suspects underflow."""
    precisions = [torch.finfo(compute_dtype(dtype)) for dtype in dtypes]
    return max((n * info.tiny / info.eps for info in precisions), default=0.0)


def exact_gram(block: Tensor) -> Tensor:
    """``block @ block.T`` in float64 without underflow, for rows of any magnitude.

    Each row is scaled by the power of two that brings its largest entry to ``[0.5, 1)``
    (exact), the scaled rows are multiplied in float64 chunks, and the scales are undone
    in float64. Reads ``block`` twice and allocates one float64 chunk at a time; meant for
    the rare steps where :func:`underflow_suspected` is true.
    """
    rows, n = block.shape
    amax = torch.linalg.vector_norm(block, ord=math.inf, dim=1).double()
    exponent = torch.frexp(amax).exponent
    scale = torch.ldexp(torch.ones_like(amax), -exponent)
    acc = torch.zeros(rows, rows, dtype=torch.float64, device=block.device)
    width = CPU_CHUNK if block.device.type == "cpu" else CHUNK
    for start in range(0, n, width):
        chunk = block[:, start : start + width].double() * scale[:, None]
        acc += chunk @ chunk.T
    acc = torch.ldexp(acc, exponent[:, None] + exponent[None, :])
    return (acc + acc.T) / 2


def cross(block: Tensor, vector: Tensor) -> Tensor:
    """Return ``block @ vector`` in float64 (the dot product of each row with ``vector``)."""
    if block.dtype in _LOW_PRECISION:
        acc = torch.zeros(block.shape[0], dtype=torch.float64, device=block.device)
        with ieee_fp32_matmul():
            for part, chunk in _upcast_chunks(block):
                acc += chunk @ vector[part].float()
        return acc
    with ieee_fp32_matmul():
        return (block @ vector).double()


def combine_(out: Tensor, block: Tensor, weights: Tensor, *, accumulate: bool) -> Tensor:
    """Write ``out ← out + blockᵀ weights`` (``accumulate``) or ``out ← blockᵀ weights``.

    ``out`` has shape ``(n,)``, ``block`` shape ``(r, n)`` and ``weights`` shape ``(r,)``
    (any floating dtype; it is cast to the compute precision). ``out`` must not overlap
    ``block``. Returns ``out``.
    """
    if kernels.supports(block, out):
        kernels.combine_(out, block, weights, accumulate=accumulate)
        return out
    beta = 1.0 if accumulate else 0.0
    with ieee_fp32_matmul():
        if block.dtype not in _LOW_PRECISION:
            return out.addmv_(block.T, weights.to(block.dtype), beta=beta)
        w = weights.float()
        for part, chunk in _upcast_chunks(block):
            combined = chunk.T @ w
            if accumulate:
                combined += out[part].float()
            out[part].copy_(combined)
    return out


def combine_checked_(out: Tensor, block: Tensor, weights: Tensor) -> Tensor:
    """Write ``out ← blockᵀ weights`` as :func:`combine_` does; 0-d bool: surely finite.

    Each written column chunk is reduced while it is still in cache: fp32 and fp64 chunks
    to their sum, fp16 and bf16 chunks to their smallest and largest value. NaN and ±Inf
    propagate through every sum (``Inf − Inf`` is NaN) and every minimum and maximum, so
    ``True`` proves every written value finite. ``False`` means a written value is NaN or
    ±Inf, or (fp32 and fp64 only, for values near the dtype's largest) that a sum of
    finite values overflowed: read ``out`` again to tell. The written values are
    :func:`combine_`'s (each column is computed alone). The compiled kernels count the
    non-finite values they write instead, which is exact.
    """
    if kernels.supports(block, out):
        bad = kernels.combine_(out, block, weights, accumulate=False, count=True)
        return torch.tensor(bad == 0)
    width = CPU_CHUNK if block.device.type == "cpu" else CHUNK
    reduced = [torch.zeros((), dtype=out.dtype, device=out.device)]
    with ieee_fp32_matmul():
        if block.dtype not in _LOW_PRECISION:
            w = weights.to(block.dtype)
            for start in range(0, block.shape[1], width):
                part = slice(start, min(start + width, block.shape[1]))
                reduced.append(out[part].addmv_(block[:, part].T, w, beta=0.0).sum())
        else:
            w = weights.float()
            for part, chunk in _upcast_chunks(block):
                reduced.extend(torch.aminmax(out[part].copy_(chunk.T @ w)))
    return torch.stack(reduced).isfinite().all()


def combine_overflows(out: Tensor, block: Tensor, weights: Tensor, *, accumulate: bool) -> Tensor:
    """0-d bool: whether :func:`combine_` would write an Inf or NaN into ``out``.

    Computes the combination as :func:`combine_` does, one column chunk at a time, and
    writes nothing. A full pass over the gradients: call it only when a bound from the
    Gram matrix cannot rule an overflow out.
    """
    beta = 1.0 if accumulate else 0.0
    width = CPU_CHUNK if block.device.type == "cpu" else CHUNK
    flags = []
    with ieee_fp32_matmul():
        if block.dtype not in _LOW_PRECISION:
            w = weights.to(block.dtype)
            for start in range(0, block.shape[1], width):
                part = slice(start, min(start + width, block.shape[1]))
                combined = torch.addmv(out[part], block[:, part].T, w, beta=beta)
                flags.append(combined.isfinite().all())
        else:
            w = weights.float()
            for part, chunk in _upcast_chunks(block):
                combined = chunk.T @ w
                if accumulate:
                    combined += out[part].float()
                flags.append(combined.to(out.dtype).isfinite().all())
    return ~torch.stack(flags).all()


def is_exact(dtypes: Iterable[torch.dtype]) -> bool:
    """Whether a Gram of gradients of these dtypes is accumulated in float64 already."""
    dtypes = list(dtypes)
    return bool(dtypes) and all(compute_dtype(dtype) == torch.float64 for dtype in dtypes)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: fp32 for fp16/bf16 gradients, else their own."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype

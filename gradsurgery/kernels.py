"""Compiled CPU kernels for the Gram matrix and the combination of rows (optional, Numba).

PyTorch's CPU BLAS multiplies a ``(r, n)`` block by its transpose with small-matrix kernels
that are bound by arithmetic when ``r ≤ 9`` and ``n`` is in the millions: two to five times
slower than reading the rows (see docs/benchmarks.md). The kernels here read each row once,
in column chunks of :data:`COLUMNS` that stay in the core's cache, and form the
``r(r+1)/2`` dot products in register tiles. Each chunk's sums are accumulated in the
rows' precision (fp32 for bf16, whose values widen to fp32 exactly) and added up in float64,
which is more accurate than one BLAS call. The combination ``out ← (out +) Σ_k w_k row_k``
adds four rows per pass over a chunk; in bf16 it accumulates in fp32 and rounds once to the
nearest even bf16, as PyTorch's conversion does.

They run when `Numba <https://numba.pydata.org>`_ is installed (``pip install
"gradsurgery[fast]"``) and the environment variable ``GRADSURGERY_KERNELS`` is not ``0``, on
CPU blocks of fp32, fp64 and bf16 in row-major order; :mod:`gradsurgery.gram` otherwise
computes the same quantities with PyTorch operations (``tests/test_kernels.py`` checks that
the two agree). Large blocks are split by columns over ``torch.get_num_threads()`` threads
(the kernels release the GIL). Numba caches the compiled code on disk; the first call in a
fresh environment compiles those of its dtype (a few seconds).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from itertools import pairwise
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradsurgery import sync

__all__ = [
    "COLUMNS",
    "available",
    "combine_",
    "combine_segments_",
    "gram",
    "segment_gram",
    "supports",
]

COLUMNS = 4096
"""Columns per chunk: 9 rows of 4096 fp32 values (144 KiB) stay in a core's L2 cache, and
fp32 sums of at most 4096 products keep every Gram entry within 1e-7 of float64 (relative
to the rows' norms) from 10⁴ columns on; 8192 was as fast and, on positive rows, 1.1e-7."""

_PER_THREAD = 1 << 20
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def available() -> bool:
    """Whether the compiled kernels are used: ``GRADSURGERY_KERNELS != 0`` and Numba works.

    If Numba is installed but fails to load them, a ``RuntimeWarning`` says so once.
    """
    return os.environ.get("GRADSURGERY_KERNELS", "1") != "0" and _compiled() is not None


def supports(block: Tensor, out: Tensor | None = None) -> bool:
    """Whether the kernels take ``block`` (and ``out``, for a combination into it).

    ``block``: a row-major fp32, fp64 or bf16 matrix on the CPU (a device where
    :func:`gradsurgery.sync.host_reads_are_free`); ``out``: a contiguous vector of its dtype,
    device and column count.
    """
    fits = out is None or (
        out.dtype == block.dtype
        and out.device == block.device
        and out.shape == block.shape[1:]
        and out.is_contiguous()
    )
    return (
        fits
        and sync.host_reads_are_free(block.device)
        and block.dtype in _DTYPES
        and block.dim() == 2
        and block.is_contiguous()
        and available()
    )


def gram(block: Tensor) -> Tensor:
    """``block @ block.T`` in float64, exactly symmetric, for a block :func:`supports` takes."""
    kernels = _checked(block)
    rows, n = block.shape
    padded = kernels.padded_rows(rows)
    array, zero = _array(block)
    parts = _columns(n)
    outs = [np.zeros((padded, padded)) for _ in parts]
    _run(
        kernels.gram,
        [(array, *part, zero, out, COLUMNS) for part, out in zip(parts, outs, strict=True)],
    )
    total = sum(outs[1:], outs[0])
    lower = torch.from_numpy(total[:rows, :rows]).tril()
    return lower + lower.tril(-1).T


def combine_(
    out: Tensor, block: Tensor, weights: Tensor, *, accumulate: bool, count: bool = False
) -> int:
    """``out ← out + blockᵀ w`` (``accumulate``) or ``out ← blockᵀ w``; ``count``: the Inf/NaN.

    ``out`` ``(n,)`` and ``block`` ``(r, n)`` are contiguous CPU tensors of one dtype that
    :func:`supports` takes, and do not overlap; ``weights`` has ``r`` entries. Sums are
    accumulated in the rows' precision (fp32 for bf16, rounded once to the nearest even).
    With ``count``, returns the number of NaN and ±Inf values written, counted while each
    chunk is in cache (else 0).
    """
    kernels = _checked(block, out, weights, block.shape[:1])
    kernel = kernels.combine_bf16 if block.dtype == torch.bfloat16 else kernels.combine
    target, rows, w = _operands(out, block, weights)
    parts = _columns(out.numel())
    calls = [(target, rows, *part, w, accumulate, count, COLUMNS) for part in parts]
    return int(sum(_run(kernel, calls)))


def segment_gram(block: Tensor, bounds: np.ndarray) -> Tensor:
    """``(len(bounds) - 1, r, r)`` float64: the Gram of each column segment of ``block``.

    Segment ``s`` holds columns ``bounds[s]`` to ``bounds[s + 1]``: ``bounds`` is an int64
    array that starts at 0, never decreases and ends at the column count.
    """
    kernels = _checked(block, bounds=bounds)
    rows = block.shape[0]
    padded = kernels.padded_rows(rows)
    array, zero = _array(block)
    out = np.zeros((len(bounds) - 1, padded, padded))
    kernels.segment_gram(array, bounds, zero, out, COLUMNS)
    lower = torch.from_numpy(out[:, :rows, :rows]).tril()
    return lower + lower.tril(-1).transpose(1, 2)


def combine_segments_(out: Tensor, block: Tensor, weights: Tensor, bounds: np.ndarray) -> None:
    """``out[segment s] ← Σ_k weights[s, k] · block[k, segment s]`` for each segment.

    Segments as in :func:`segment_gram`; ``out`` and ``block`` as in :func:`combine_`;
    ``weights`` has shape ``(len(bounds) - 1, r)``.
    """
    kernels = _checked(block, out, weights, (len(bounds) - 1, block.shape[0]), bounds)
    bf16 = block.dtype == torch.bfloat16
    kernel = kernels.combine_segments_bf16 if bf16 else kernels.combine_segments
    target, rows, w = _operands(out, block, weights)
    kernel(target, rows, bounds, w, COLUMNS)


def _checked(
    block: Tensor,
    out: Tensor | None = None,
    weights: Tensor | None = None,
    weights_shape: tuple[int, ...] = (),
    bounds: np.ndarray | None = None,
) -> Any:
    """The compiled kernels, once the arguments are ones they read and write within bounds.

    Raises:
        ImportError: Numba is not installed or cannot load them.
        ValueError: what the kernels do not take, said in the message.
    """
    kernels = _module()
    if not supports(block, out):
        what = "" if out is None else f" and out {tuple(out.shape)} {out.dtype} on {out.device}"
        raise ValueError(
            f"the compiled kernels take a contiguous 2-D fp32, fp64 or bf16 CPU block and a "
            f"contiguous vector of its dtype and column count, got block {tuple(block.shape)} "
            f"{block.dtype} on {block.device}{what}; use gradsurgery.gram for anything else"
        )
    if weights is not None and tuple(weights.shape) != weights_shape:
        raise ValueError(f"weights must have shape {weights_shape}, got {tuple(weights.shape)}")
    if bounds is not None and not (
        bounds.dtype == np.int64
        and bounds.ndim == 1
        and len(bounds) >= 1
        and bounds[0] == 0
        and bounds[-1] == block.shape[1]
        and bool((np.diff(bounds) >= 0).all())
    ):
        raise ValueError(
            f"bounds must be int64 from 0 to the {block.shape[1]} columns, never decreasing, "
            f"got {bounds!r}"
        )
    return kernels


def _operands(out: Tensor, block: Tensor, weights: Tensor) -> tuple[Any, Any, Any]:
    """``out``, ``block`` and ``weights`` as the combination kernels take them."""
    if block.dtype == torch.bfloat16:
        w = weights.detach().to(device="cpu", dtype=torch.float32)
        return _bits(out), _bits(block), w.numpy()
    w = weights.detach().to(device="cpu", dtype=block.dtype)
    return out.numpy(), block.numpy(), w.numpy()


def _array(block: Tensor) -> tuple[Any, Any]:
    """``block`` as a NumPy array the kernels read, and the zero of their accumulators."""
    if block.dtype == torch.bfloat16:
        return _bits(block), np.float32(0)
    array = block.detach().numpy()
    return array, array.dtype.type(0)


def _columns(n: int) -> list[tuple[int, int]]:
    """Column ranges ``[start, stop)`` of whole chunks, one per thread if ``n`` is worth it."""
    if n < 2 * _PER_THREAD:
        return [(0, n)]
    threads = min(torch.get_num_threads(), n // _PER_THREAD)
    chunks = -(-n // COLUMNS)
    bounds = [COLUMNS * (chunks * i // threads) for i in range(threads)] + [n]
    return list(pairwise(bounds))


def _run(kernel: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
    """``kernel`` called on each argument tuple, on the pool's threads if more than one."""
    if len(calls) == 1:
        return [kernel(*calls[0])]
    return [future.result() for future in [_pool().submit(kernel, *args) for args in calls]]


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count(), thread_name_prefix="gradsurgery")


if hasattr(os, "register_at_fork"):  # a forked child has none of its parent's threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


def _bits(tensor: Tensor) -> Any:
    return tensor.detach().view(torch.int16).numpy().view(np.uint16)


def _module() -> Any:
    kernels = _compiled()
    if kernels is None:
        raise ImportError('gradsurgery.kernels needs Numba: pip install "gradsurgery[fast]"')
    return kernels


@cache
def _compiled() -> ModuleType | None:
    try:
        from gradsurgery import _numba_kernels
    except ImportError:
        return None
    except Exception as error:  # Numba is there but unusable (e.g. no place to cache code)
        warnings.warn(
            f"gradsurgery's compiled kernels are off: Numba failed here ({error!r}); PyTorch's "
            "operations compute the same, slower on the CPU. GRADSURGERY_KERNELS=0 silences this",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _numba_kernels

"""Flat gradients: one contiguous block per dtype, with every ``p.grad`` a view into it.

A :class:`GradientBank` holds ``rows`` gradients of the same parameters as a ``(rows, p)``
block (one block per parameter dtype). Row 0 is what the parameters' ``.grad`` point at,
that is what the inner optimizer reads; the other rows store extra gradients (GEM
constraints, per-language objectives). To fill row ``r``, :meth:`GradientBank.route`
points every ``.grad`` at row ``r`` for the duration of a backward pass: autograd adds
into an existing ``.grad`` in place, so the gradient lands in its row without a copy, and
no memory proportional to ``p`` is allocated per step.

Because the rows are contiguous, the Gram matrix of all rows is one matrix product and a
combination of rows one matrix-vector product (see :mod:`gradsurgery.gram`).

Sharded parameters (``DTensor``, e.g. from FSDP2's ``fully_shard``) are stored by their
local shard: each ``.grad`` is a ``DTensor`` whose local tensor is the view, so the sharded
gradient FSDP2 reduce-scatters is added into the row in place.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from gradsurgery import gram as _gram
from gradsurgery import segments as _segments
from gradsurgery.segments import Segments

__all__ = ["GradientBank", "local"]


def _dtensor() -> Any:
    """The ``DTensor`` class if it was imported (a DTensor can exist only then), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def local(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this process holds: the local shard of a ``DTensor``, or itself."""
    dtensor = _dtensor()
    if dtensor is not None and isinstance(tensor, dtensor):
        shard: Tensor = tensor.to_local()
        return shard
    return tensor


def _as_grad(param: Tensor, view: Tensor) -> Tensor:
    """What ``param.grad`` is set to for the row ``view``: the view, or a DTensor around it."""
    dtensor = _dtensor()
    if dtensor is not None and isinstance(param, dtensor):
        sharded: Any = param
        grad: Tensor = dtensor.from_local(
            view,
            sharded.device_mesh,
            sharded.placements,
            run_check=False,
            shape=sharded.shape,
            stride=sharded.stride(),
        )
        return grad
    return view


def _unique(params: Iterable[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    unique = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


class GradientBank:
    """Contiguous ``(rows, p)`` gradient storage for a set of parameters on one device.

    Args:
        params: the parameters; those with ``requires_grad=False`` are left out, duplicates
            are kept once. Gradients they already have are copied into row 0.
        rows: number of gradient rows (at least 1).

    Raises:
        ValueError: no trainable parameter, parameters on several devices, a parameter that
            is not a dense (strided) tensor, or ``rows < 1``.
    """

    def __init__(self, params: Iterable[Tensor], rows: int) -> None:
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        trainable = [p for p in _unique(params) if p.requires_grad]
        if not trainable:
            raise ValueError("no trainable parameter (all have requires_grad=False)")
        devices = sorted({str(p.device) for p in trainable})
        if len(devices) > 1:
            raise ValueError(
                f"trainable parameters are on several devices ({', '.join(devices)}); "
                "a wrapper needs all of its parameters on one device: wrap each device's "
                "parameters in their own optimizer"
            )
        for p in trainable:
            if p.layout != torch.strided:
                raise ValueError(f"parameter of layout {p.layout} is not supported; only dense")
        dtypes = list(dict.fromkeys(p.dtype for p in trainable))
        self.params: tuple[Tensor, ...] = tuple(
            p for dtype in dtypes for p in trainable if p.dtype == dtype
        )
        self.device = trainable[0].device
        self.rows = rows
        self.blocks: tuple[Tensor, ...] = tuple(
            torch.zeros(
                rows,
                sum(local(p).numel() for p in trainable if p.dtype == dtype),
                dtype=dtype,
                device=self.device,
            )
            for dtype in dtypes
        )
        self._views: list[list[Tensor]] = [[] for _ in range(rows)]
        self._grads: list[list[Tensor]] = [[] for _ in range(rows)]
        self._index: dict[int, tuple[int, slice]] = {}
        offset, block = 0, 0
        for p in self.params:
            if self.blocks[block].dtype != p.dtype:
                offset, block = 0, block + 1
            shape = local(p).shape
            part = slice(offset, offset + shape.numel())
            self._index[id(p)] = (block, part)
            for row in range(rows):
                view = self.blocks[block][row, part].view(shape)
                self._views[row].append(view)
                self._grads[row].append(_as_grad(p, view))
            offset = part.stop
        with torch.no_grad():
            for p, view in zip(self.params, self._views[0], strict=True):
                if p.grad is not None:
                    view.copy_(local(p.grad))
        self._segments: tuple[Segments, ...] | None = None
        self.bound_row = 0
        self.bind(0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_views"], state["_grads"]  # views into the blocks: rebuilt from them
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copy (``copy.deepcopy``, ``pickle``): re-key by the copied parameters."""
        self.__dict__.update(state)
        places = list(state["_index"].values())
        self._index = {id(p): place for p, place in zip(self.params, places, strict=True)}
        self._views = [
            [
                self.blocks[block][row, part].view(local(p).shape)
                for p, (block, part) in zip(self.params, places, strict=True)
            ]
            for row in range(self.rows)
        ]
        self._grads = [
            [_as_grad(p, view) for p, view in zip(self.params, views, strict=True)]
            for views in self._views
        ]
        self.bind(self.bound_row)

    @property
    def numel(self) -> int:
        """Number of gradient entries in one row (``p``)."""
        return sum(block.shape[1] for block in self.blocks)

    def row_views(self, row: int) -> list[Tensor]:
        """The views of ``row`` shaped like each parameter's local part, in :attr:`params` order."""
        return self._views[row]

    def bind(self, row: int) -> None:
        """Point every parameter's ``.grad`` at its view into ``row``."""
        for p, grad in zip(self.params, self._grads[row], strict=True):
            p.grad = grad
        self.bound_row = row

    @contextmanager
    def route(self, row: int) -> Iterator[None]:
        """Send the gradients of backward passes run inside the block into ``row``."""
        if self.bound_row != 0:
            raise RuntimeError(
                f"gradients are already routed to row {self.bound_row}; routing does not nest"
            )
        self.repair()
        self.bind(row)
        try:
            yield
        finally:
            self.repair_row(row)
            self.bind(0)

    def repair(self) -> int:
        """Make every ``.grad`` a view into row 0 again; return how many had to be re-bound.

        A ``.grad`` stops being a view when code outside the wrapper replaces it, e.g.
        ``model.zero_grad()`` (which sets it to ``None``) followed by a backward pass. Its
        value is copied into row 0 (``None`` counts as zero), so nothing is lost.
        """
        return self.repair_row(0)

    def repair_row(self, row: int) -> int:
        """Like :meth:`repair`, for the views into ``row``."""
        repaired = 0
        with torch.no_grad():
            for p, view, bound in zip(self.params, self._views[row], self._grads[row], strict=True):
                grad = p.grad
                if grad is bound:
                    continue
                repaired += 1
                if grad is None:
                    view.zero_()
                else:
                    view.copy_(local(grad))
                p.grad = bound
        return repaired

    def owns(self, params: Iterable[Tensor]) -> bool:
        """Whether ``params`` are exactly the trainable parameters this bank was built for."""
        trainable = [p for p in _unique(params) if p.requires_grad]
        return len(trainable) == len(self.params) and all(id(p) in self._index for p in trainable)

    def rebuilt(self, params: Iterable[Tensor]) -> GradientBank:
        """A new bank for ``params`` that keeps the rows of the parameters both hold."""
        new = GradientBank(params, self.rows)
        with torch.no_grad():
            for p in new.params:
                if id(p) in self._index:
                    block, part = self._index[id(p)]
                    new_block, new_part = new._index[id(p)]
                    new.blocks[new_block][:, new_part].copy_(self.blocks[block][:, part])
        return new

    def zero_(self, rows: slice | int = slice(None)) -> None:
        """Set the given rows (default: all) to zero."""
        for block in self.blocks:
            block[rows].zero_()

    def gram(self) -> Tensor:
        """The ``(rows, rows)`` Gram matrix of the rows, in float64 on the bank's device."""
        total = _gram.gram(self.blocks[0])
        for block in self.blocks[1:]:
            total = total + _gram.gram(block)
        return total

    def combine_(self, weights: Tensor, *, accumulate: bool, rows: slice = slice(1, None)) -> None:
        """Write ``row0 ← row0 + Σ_k w_k row_k`` (``accumulate``) or ``row0 ← Σ_k w_k row_k``.

        ``weights`` has one entry per row of ``rows`` (default: every row after the first).
        """
        for block in self.blocks:
            _gram.combine_(block[0], block[rows], weights, accumulate=accumulate)

    @property
    def segments(self) -> tuple[Segments, ...]:
        """Per block, its parameters as column segments (for per-tensor methods)."""
        if self._segments is None:
            self._segments = tuple(
                Segments(
                    [local(p).numel() for p in self.params if p.dtype == block.dtype], self.device
                )
                for block in self.blocks
            )
        return self._segments

    def segment_gram(self, rows: slice) -> Tensor:
        """``(n_params, r, r)``: the Gram matrix of ``rows`` within each parameter tensor."""
        grams = [
            _segments.segment_gram(block[rows], segments)
            for block, segments in zip(self.blocks, self.segments, strict=True)
        ]
        return grams[0] if len(grams) == 1 else torch.cat(grams)

    def combine_segments_(self, weights: Tensor, rows: slice) -> None:
        """Write ``row0`` of each parameter as ``Σ_k weights[param, k] · row_k`` of it."""
        start = 0
        for block, segments in zip(self.blocks, self.segments, strict=True):
            part = weights[start : start + segments.count]
            _segments.combine_segments_(block[0], block[rows], part, segments)
            start += segments.count

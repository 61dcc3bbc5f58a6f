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

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from gradsurgery import gram as _gram
from gradsurgery import segments as _segments
from gradsurgery.binding import (
    BankChanges,
    alias,
    as_grad,
    check_supported,
    copy_into,
    local,
    signature,
    track,
)
from gradsurgery.segments import Segments

__all__ = ["GradientBank", "local"]


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

    Each ``.grad`` aliases its parameter's segment of a row (same memory, the parameter's
    strides; not an autograd view, so ``p.grad.detach_()`` works). The bank also records,
    per row, which parameters a backward pass reached since the row was last cleared (a
    post-accumulate-grad hook per parameter, removed with the bank), so that a parameter
    without a gradient can be handed to the inner optimizer as ``None``, as torch does.

    Args:
        params: the parameters; those with ``requires_grad=False`` are left out, duplicates
            are kept once. Gradients they already have are copied into row 0.
        rows: number of gradient rows (at least 1).

    Raises:
        ValueError: no trainable parameter, parameters on several devices or on the meta
            device, a parameter that is not a dense (strided) real tensor, or ``rows < 1``.
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
            check_supported(p)
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
        self._sharded = any(local(p) is not p for p in self.params)
        self._signatures = {id(p): signature(p) for p in self.params}
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._index: dict[int, tuple[int, slice]] = {}
        self._views: list[list[Tensor]] = [[] for _ in range(rows)]
        self._grads: list[list[Tensor]] = [[] for _ in range(rows)]
        self._pointers: list[list[int]] = [[] for _ in range(rows)]
        offset, block = 0, 0
        for p in self.params:
            if self.blocks[block].dtype != p.dtype:
                offset, block = 0, block + 1
            part = slice(offset, offset + local(p).numel())
            self._index[id(p)] = (block, part)
            for row in range(rows):
                self._append(row, p, alias(self.blocks[block][row], offset, local(p)))
            offset = part.stop
        self._reached = [bytearray(len(self.params)) for _ in range(rows)]
        self._zero_versions: list[int] | None = None
        self.bound_row = 0
        self.split = False
        with torch.no_grad():
            for i, (p, view) in enumerate(zip(self.params, self._views[0], strict=True)):
                if p.grad is not None and p.grad.shape == p.shape:
                    copy_into(view, p.grad)
                    self._reached[0][i] = 1
        self._segments: tuple[Segments, ...] | None = None
        self.close = track(self, self.params, self._mark)
        self.bind(0)

    def _append(self, row: int, p: Tensor, view: Tensor) -> None:
        self._views[row].append(view)
        self._grads[row].append(as_grad(p, view))
        self._pointers[row].append(view.data_ptr())

    def _mark(self, param: Tensor) -> None:
        position = self._position.get(id(param))
        if position is not None:
            self._reached[self.bound_row][position] = 1

    def __reduce__(self) -> tuple[Any, ...]:
        """Copy (``copy.deepcopy``, ``pickle``) as a new bank around the copied parameters.

        The rows and the record of reached parameters are copied; the hooks are the new
        bank's own.
        """
        return (_restored, (self.params, self.rows, self.blocks, self._reached))

    @property
    def numel(self) -> int:
        """Number of gradient entries in one row (``p``)."""
        return sum(block.shape[1] for block in self.blocks)

    def row_views(self, row: int) -> list[Tensor]:
        """The views of ``row`` shaped like each parameter's local part, in :attr:`params` order."""
        return self._views[row]

    def _intact(self, p: Tensor) -> bool:
        """Whether ``p`` still has the dtype, device, shape and strides it was bound with."""
        return signature(p) == self._signatures[id(p)]

    def bind(self, row: int) -> bool:
        """Point every parameter's ``.grad`` at its view into ``row``.

        A parameter whose dtype, shape or device changed since the bank was built cannot
        take the view (torch refuses it) and is left alone: only a rebuilt bank
        (:meth:`rebuilt`) can hold it. Returns whether every parameter was bound.
        """
        bound = True
        for p, grad in zip(self.params, self._grads[row], strict=True):
            try:
                p.grad = grad
            except RuntimeError:
                bound = False
        self.bound_row = row
        return bound

    @contextmanager
    def route(self, row: int) -> Iterator[None]:
        """Send the gradients of backward passes run inside the block into ``row``.

        If a parameter's dtype, shape or layout changes inside the block, its gradient is
        left in two places; :attr:`split` tells so afterwards.
        """
        if self.bound_row != 0:
            raise RuntimeError(
                f"gradients are already routed to row {self.bound_row}; routing does not nest"
            )
        self.split = False
        self.repair()
        self.bind(row)
        try:
            yield
        finally:
            self.repair_row(row)
            if not self.bind(0):
                self.split = True

    def repair(self) -> int:
        """Make every ``.grad`` a view into row 0 again; return how many had to be re-bound.

        A ``.grad`` stops being a view when code outside the wrapper replaces it, e.g.
        ``model.zero_grad()`` (which sets it to ``None``) followed by a backward pass, or
        ``Module._apply`` (``model.to(...)``) replacing its memory. Its value is copied into
        row 0 (``None`` counts as zero and as no gradient), so nothing is lost.
        """
        return self.repair_row(0)

    def repair_row(self, row: int) -> int:
        """Like :meth:`repair`, for the views into ``row``."""
        repaired = 0
        pointers = self._pointers[row]
        with torch.no_grad():
            for i, (p, bound) in enumerate(zip(self.params, self._grads[row], strict=True)):
                grad = p.grad
                if grad is bound and self._pointer(grad) == pointers[i]:
                    continue
                if not self._intact(p):
                    self.split = True
                    continue
                repaired += 1
                if row == 0:
                    self._zero_versions = None
                if grad is bound:  # its memory was replaced: bind a fresh alias
                    block, part = self._index[id(p)]
                    view = alias(self.blocks[block][row], part.start, local(p))
                    self._views[row][i], self._grads[row][i] = view, as_grad(p, view)
                    pointers[i] = view.data_ptr()
                if grad is None:
                    self._views[row][i].zero_()
                    self._reached[row][i] = 0
                else:
                    copy_into(self._views[row][i], grad)
                    self._reached[row][i] = 1
                p.grad = self._grads[row][i]
        return repaired

    def _pointer(self, grad: Tensor) -> int:
        return local(grad).data_ptr() if self._sharded else grad.data_ptr()

    def changes(self, params: Iterable[Tensor]) -> BankChanges:
        """How the trainable ones among ``params`` differ from those the bank holds."""
        return BankChanges.between(params, self.params, self._signatures)

    def owns(self, params: Iterable[Tensor]) -> bool:
        """Whether ``params`` are exactly the trainable parameters this bank was built for.

        They must also still have the dtype, device, shape and memory layout they had then.
        """
        return not self.changes(params)

    def rebuilt(
        self, params: Iterable[Tensor], sources: Sequence[int | None] | None = None
    ) -> GradientBank:
        """A new bank for ``params`` that carries over what this one holds.

        Must be called with gradients bound to row 0. Row 0 comes from each ``.grad``
        (converted to the parameter's new dtype and layout); the other rows and the record
        of which parameters got a gradient are carried for every parameter of unchanged
        shape. A parameter that left (frozen) keeps a copy of its ``.grad`` if it had one,
        as it would in torch, else ``None``; this bank's hooks are removed. ``sources``
        gives, for each row of the new bank after row 0, the row of this one it carries, or
        ``None`` for a zero row (default: the same rows).
        """
        params = _unique(params)
        before = {id(p): p.grad for p in params}
        carried = list(range(1, self.rows)) if sources is None else list(sources)
        new = GradientBank(params, 1 + len(carried))
        with torch.no_grad():
            for i, p in enumerate(new.params):
                j = self._position.get(id(p))
                if j is None:
                    continue
                if before[id(p)] is self._grads[0][j]:
                    new._reached[0][i] = self._reached[0][j]
                if p.shape != self._signatures[id(p)][2]:
                    continue
                for row, source in enumerate(carried, start=1):
                    if source is not None:
                        copy_into(new._views[row][i], self._views[source][j])
                        new._reached[row][i] = self._reached[source][j]
        for j, p in enumerate(self.params):
            if id(p) not in new._position and any(p.grad is g[j] for g in self._grads):
                had = self._reached[0][j]  # the extra rows are not .grad
                # torch keeps a frozen parameter's .grad (the inner optimizer steps it)
                p.grad = as_grad(p, self._views[0][j].detach().clone()) if had else None
        self.close()
        return new

    def forget(self, rows: slice) -> None:
        """Record that no parameter got a gradient in ``rows``."""
        for reached in self._reached[rows]:
            reached[:] = bytes(len(reached))

    def record_step(self, withheld: Iterable[int]) -> None:
        """Record that a step gave ``.grad`` to every parameter but those at ``withheld``.

        As in torch after ``step()``, they keep it (zeroed by ``zero_grad(set_to_none=False)``,
        and stepped with it) until gradients are set to ``None``; the extra rows are spent.
        """
        first = self._reached[0]
        first[:] = b"\x01" * len(first)
        for i in withheld:
            first[i] = 0
        self.forget(slice(1, None))

    def holds_gradient(self, param: Tensor) -> bool:
        """Whether ``param``'s ``.grad`` is its row-0 view and it has a gradient in any row."""
        i = self._position[id(param)]
        return param.grad is self._grads[0][i] and any(row[i] for row in self._reached)

    def without_gradient(self) -> list[int]:
        """Positions in :attr:`params` of the parameters no backward pass reached in any row."""
        return [i for i, flags in enumerate(zip(*self._reached, strict=True)) if not any(flags)]

    @contextmanager
    def withheld(self, positions: list[int]) -> Iterator[None]:
        """Set ``.grad`` to ``None`` for the parameters at ``positions`` inside the block."""
        for i in positions:
            self.params[i].grad = None
        try:
            yield
        finally:
            for i in positions:
                self.params[i].grad = self._grads[0][i]

    def zero_(self, rows: slice | int = slice(None)) -> None:
        """Set the given rows (default: all) to zero."""
        for block in self.blocks:
            block[rows].zero_()

    def mark_row0_zero(self) -> None:
        """Record that row 0 is zero now (right after it was zeroed), for :meth:`row0_zero`."""
        self._zero_versions = None if self._sharded else [g._version for g in self._grads[0]]

    def forget_row0_zero(self) -> None:
        """Record that row 0 may hold values now (written through the blocks, not ``.grad``)."""
        self._zero_versions = None

    def row0_zero(self) -> bool:
        """Whether row 0 is known zero, without reading it (False: unknown).

        True if no ``.grad`` was written in place (each has its own version counter, which
        every in-place write, a backward pass's included, increments), replaced or combined
        into since :meth:`mark_row0_zero`.
        """
        versions = self._zero_versions
        return versions is not None and all(
            p.grad is g and g._version == v
            for p, g, v in zip(self.params, self._grads[0], versions, strict=True)
        )

    def gram(self, *, exact: bool = False, rows: slice = slice(None)) -> Tensor:
        """The Gram matrix of ``rows`` (default: all), in float64 on the bank's device.

        ``exact`` computes it without underflow (:func:`gradsurgery.gram.exact_gram`).
        """
        of = _gram.exact_gram if exact else _gram.gram
        total = of(self.blocks[0][rows])
        for block in self.blocks[1:]:
            total = total + of(block[rows])
        return total

    def combine_(self, weights: Tensor, *, accumulate: bool, rows: slice = slice(1, None)) -> None:
        """Write ``row0 ← row0 + Σ_k w_k row_k`` (``accumulate``) or ``row0 ← Σ_k w_k row_k``.

        ``weights`` has one entry per row of ``rows`` (default: every row after the first).
        """
        self.forget_row0_zero()
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
        self.forget_row0_zero()
        start = 0
        for block, segments in zip(self.blocks, self.segments, strict=True):
            part = weights[start : start + segments.count]
            _segments.combine_segments_(block[0], block[rows], part, segments)
            start += segments.count


def _restored(
    params: tuple[Tensor, ...], rows: int, blocks: tuple[Tensor, ...], reached: list[bytearray]
) -> GradientBank:
    bank = GradientBank(params, rows)
    with torch.no_grad():
        for new, old in zip(bank.blocks, blocks, strict=True):
            new.copy_(old)
    bank._reached = [bytearray(row) for row in reached]
    return bank

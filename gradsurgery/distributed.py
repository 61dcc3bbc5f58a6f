r"""Gradient surgery across processes: data-parallel (DDP) and sharded (FSDP2) training.

Every wrapper takes ``distributed=`` one of two layouts; both make every rank apply the
identical update.

:class:`Replicated` (``DistributedDataParallel``): every rank holds the whole gradient of
its own batch. DDP averages ``.grad`` (row 0) during the task's backward pass; the extra
rows (constraints, objectives) are filled under ``ddp_model.no_sync()`` and the wrapper
averages them itself before the surgery: in **one** all-reduce over the contiguous
``(t, p)`` block, after which each rank holds the gradients one process would have on the
union of the batches and computes the same step from the same numbers; or, from two rows
on, by a reduce-scatter of each row, the sharded protocol below on each rank's columns,
and one all-gather of the rewritten ``.grad`` (fewer bytes; see :class:`Replicated`).

:class:`Sharded` (FSDP2's ``fully_shard``, or any layout where each rank holds a disjoint
part of every gradient, already reduced across the data-parallel ranks): the surgery
reads the gradients only through inner products, and

.. math::

    G = \sum_{\text{shards } s} B_s B_s^\top,

so each rank computes its shard's partial Gram matrix, **one** all-reduce of
:math:`(t+1)^2` numbers makes it global, every rank solves the same small problem, and
each writes the combination into its own shard.

NaN and Inf reach every rank through these reductions (a non-finite value anywhere makes
the reduced rows, or the reduced Gram matrix, non-finite everywhere), so every rank skips
(under a GradScaler) or raises identically; ``Uniform``, which computes no Gram matrix,
all-reduces its flags (:meth:`Replicated.any_rank`, :meth:`Sharded.any_rank`). Random orders
(PCGrad, GradVac) are drawn from a generator whose state is broadcast from the group's
first rank when the wrapper is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Union

import torch
from torch import Tensor

from gradsurgery import gram as _gram

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from gradsurgery.flat import GradientBank

__all__ = ["SCATTER_FROM", "Distributed", "Replicated", "Sharded", "check"]


SCATTER_FROM = 2
"""From how many averaged rows ``Replicated()`` reduce-scatters.

``(t + 1)·p`` values sent per rank instead of ``2t·p``: fewer from ``t = 2`` on; at
``t = 1`` both send ``2p`` and the all-reduce is one collective instead of three
(``docs/distributed.md``).
"""


@dataclass(frozen=True)
class Replicated:
    r"""Data-parallel layout (DDP): each rank holds the whole gradient of its own batch.

    With ``scatter=False`` the extra rows are averaged by one all-reduce of the ``(t, p)``
    block: :math:`2t\cdot p` values sent per rank per step in a ring. With
    ``scatter=True`` each extra row is reduce-scattered (rank :math:`s` gets the average of
    its columns :math:`C_s`), the Gram matrix is summed over the ranks' columns as under
    :class:`Sharded`, each rank writes its columns of the result into row 0 and one
    all-gather gives every rank the whole row: :math:`(t + 1)\cdot p` values. The task row
    (GEM's ``.grad``) is averaged by DDP already; every rank reads its columns of it. See
    ``docs/distributed.md`` for the figures; ``GradVac(granularity="parameter")`` refuses
    ``scatter=True`` (its per-tensor Gram matrices would cross the column shards).

    Attributes:
        group: the process group to average over (default: the world).
        scatter: ``True``: reduce-scatter the rows and all-gather the result; ``False``:
            one all-reduce of the rows; ``None`` (default): reduce-scatter from
            :data:`SCATTER_FROM` (2) averaged rows on, where the wrapper can.
    """

    group: ProcessGroup | None = None
    scatter: bool | None = None

    def resolved(self, rows: int, *, can_scatter: bool) -> Replicated:
        """The layout with ``scatter`` decided for ``rows`` averaged rows.

        ``scatter=None`` reduce-scatters from :data:`SCATTER_FROM` rows on, where the
        wrapper can run on a rank's columns (every wrapper but per-parameter GradVac).
        """
        if self.scatter is not None:
            return self
        return Replicated(self.group, scatter=can_scatter and rows >= SCATTER_FROM)

    def average_rows(self, bank: GradientBank, rows: slice) -> None:
        """Average ``rows`` of every block of ``bank`` over the group, in place.

        ``scatter=False``: one all-reduce per dtype block. ``scatter=True``: one in-place
        reduce-scatter per row and block of its ``world·⌊p/world⌋`` evenly sharded columns,
        and, when ``p`` is not a multiple of the group's size, one all-reduce of the rows'
        ``p mod world`` remaining columns (copied out: fewer than ``world`` per row); then
        only this rank's columns (:meth:`shard`) hold the average. The rows are divided by
        the group's size before the sum, as DDP does, so no row overflows.
        """
        world = torch.distributed.get_world_size(self.group)
        rank = torch.distributed.get_rank(self.group)
        for block in bank.blocks:
            part = block[rows]
            part.div_(world)
            if not self.scatter:
                torch.distributed.all_reduce(part, group=self.group)
                continue
            even = block.shape[1] // world
            if even > 0:
                for row in part:
                    mine = row[rank * even : (rank + 1) * even]
                    torch.distributed.reduce_scatter_tensor(
                        mine, row[: world * even], group=self.group
                    )
            if world * even < block.shape[1] and part.shape[0] > 0:
                tail = part[:, world * even :].contiguous()
                torch.distributed.all_reduce(tail, group=self.group)
                part[:, world * even :].copy_(tail)

    def reduce_gram(self, gram: Tensor) -> Tensor:
        """The Gram matrix of the whole gradients (summed over the column shards if ``scatter``)."""
        if self.scatter:
            torch.distributed.all_reduce(gram, group=self.group)
        return gram

    def shard(self, bank: GradientBank) -> Rows:
        """The rows the surgery reads: this rank's columns of ``bank`` when ``scatter``."""
        if not self.scatter:
            return bank
        world = torch.distributed.get_world_size(self.group)
        rank = torch.distributed.get_rank(self.group)
        return ColumnShard(bank, world, rank)

    def gather_row0(self, bank: GradientBank) -> None:
        """Give every rank the whole row 0 from each rank's columns (``scatter`` only).

        One all-gather per dtype block of the ``world·⌊p/world⌋`` evenly sharded columns,
        in place, and, when ``p`` is not a multiple of the group's size, one broadcast of
        the last rank's remaining ``p mod world`` columns.
        """
        if not self.scatter:
            return
        world = torch.distributed.get_world_size(self.group)
        rank = torch.distributed.get_rank(self.group)
        last = (
            world - 1
            if self.group is None
            else torch.distributed.get_global_rank(self.group, world - 1)
        )
        for block in bank.blocks:
            row = block[0]
            even = row.shape[0] // world
            if even > 0:
                mine = row[rank * even : (rank + 1) * even]
                torch.distributed.all_gather_into_tensor(
                    row[: world * even], mine, group=self.group
                )
            if world * even < row.shape[0]:
                torch.distributed.broadcast(row[world * even :], src=last, group=self.group)

    def any_rank(self, flag: Tensor) -> Tensor:
        """Bool ``flag`` (any shape) true wherever it is on any rank (``scatter`` only).

        For decisions read from this rank's columns; without ``scatter`` every rank reads
        the same averaged rows and decides alike: ``flag`` as is.
        """
        return _any_rank(flag, self.group) if self.scatter else flag


def _any_rank(flag: Tensor, group: ProcessGroup | None) -> Tensor:
    """Bool ``flag`` OR-ed elementwise over ``group`` (one all-reduce of its entries)."""
    value = flag.to(torch.int32)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=group)
    return value.bool()


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Column ranges of ``n`` columns over ``world`` ranks.

    ``⌊n/world⌋`` columns each; the last rank also takes the remaining ``n mod world``.
    """
    even = n // world
    return [(r * even, (r + 1) * even if r < world - 1 else n) for r in range(world)]


class Rows(Protocol):
    """What a surgery reads and writes of the gradient rows (a bank, or a column shard)."""

    @property
    def blocks(self) -> Sequence[Tensor]:
        """One ``(rows, columns)`` tensor per dtype."""
        ...

    @property
    def numel(self) -> int:
        """The length of a whole row (``p``), also for a column shard."""
        ...

    @property
    def device(self) -> torch.device:
        """The device of the rows."""
        ...

    def gram(self, *, exact: bool = False, rows: slice = slice(None)) -> Tensor:
        """The Gram matrix of ``rows`` (default: all) on these columns, in float64."""
        ...

    def combine_(self, weights: Tensor, *, accumulate: bool, rows: slice = slice(1, None)) -> None:
        """Write ``row0 (+)= Σ_k w_k row_k`` on these columns."""
        ...


class ColumnShard:
    """One rank's columns of every block of a bank (views; nothing is copied).

    ``numel`` is the whole row's length, so that every rank takes the decisions that depend
    on it (the underflow test) alike.
    """

    def __init__(self, bank: GradientBank, world: int, rank: int) -> None:
        self.blocks = [
            block[:, slice(*shard_bounds(block.shape[1], world)[rank])] for block in bank.blocks
        ]
        self.numel = bank.numel
        self.device = bank.device

    def gram(self, *, exact: bool = False, rows: slice = slice(None)) -> Tensor:
        """The partial Gram matrix of ``rows`` (default: all) on these columns, in float64.

        A block may have no column here (fewer columns than ranks): it adds nothing.
        """
        of = _gram.exact_gram if exact else _gram.gram
        count = self.blocks[0][rows].shape[0]
        total = torch.zeros(count, count, dtype=torch.float64, device=self.device)
        for block in self.blocks:
            if block.shape[1] > 0:
                total = total + of(block[rows])
        return total

    def combine_(self, weights: Tensor, *, accumulate: bool, rows: slice = slice(1, None)) -> None:
        """``GradientBank.combine_`` on these columns."""
        for block in self.blocks:
            _gram.combine_(block[0], block[rows], weights, accumulate=accumulate)


@dataclass(frozen=True)
class Sharded:
    """Sharded layout (FSDP2): each rank holds a disjoint, already reduced, part of every row.

    Attributes:
        group: the process group the gradients are sharded over (default: the world).
    """

    group: ProcessGroup | None = None

    def average_rows(self, bank: GradientBank, rows: slice) -> None:
        """Nothing to do: the sharded gradients are already reduced (by FSDP's reduce-scatter)."""

    def reduce_gram(self, gram: Tensor) -> Tensor:
        """Sum the shards' partial Gram matrices over the group (one small all-reduce)."""
        torch.distributed.all_reduce(gram, group=self.group)
        return gram

    def resolved(self, rows: int, *, can_scatter: bool) -> Sharded:
        """The layout itself: nothing to decide."""
        return self

    def shard(self, bank: GradientBank) -> Rows:
        """The rows the surgery reads: the bank, which holds this rank's shards."""
        return bank

    def gather_row0(self, bank: GradientBank) -> None:
        """Nothing to do: each rank steps its own shards."""

    def any_rank(self, flag: Tensor) -> Tensor:
        """Bool ``flag`` (any shape) true wherever it is on any rank (one small all-reduce).

        Each rank reads only its own shards: a decision read from them is made global.
        """
        return _any_rank(flag, self.group)


Distributed = Union[Replicated, Sharded]  # noqa: UP007 (a runtime alias on Python 3.10)


def check(distributed: object) -> None:
    """Raise unless ``distributed`` is ``None`` or a layout usable in this process.

    Raises:
        TypeError: not ``None``, :class:`Replicated` or :class:`Sharded`, or a
            ``Replicated`` whose ``scatter`` is not ``True``, ``False`` or ``None``.
        RuntimeError: the default process group is not initialised.
    """
    if distributed is None:
        return
    if not isinstance(distributed, (Replicated, Sharded)):
        raise TypeError(
            "distributed must be None, gradsurgery.distributed.Replicated(group) or "
            f"gradsurgery.distributed.Sharded(group), got {type(distributed).__name__}"
        )
    scatter: object = distributed.scatter if isinstance(distributed, Replicated) else None
    if not (scatter is None or isinstance(scatter, bool)):
        raise TypeError(
            "Replicated(scatter=...) must be True, False or None (the default: decided by "
            f"the number of rows), got {scatter!r}"
        )
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "distributed= needs an initialised process group: call "
            "torch.distributed.init_process_group(...) before building the wrapper"
        )


def scatters(distributed: object) -> bool:
    """Whether ``distributed`` is ``Replicated(scatter=True)`` (asked for, not decided)."""
    return isinstance(distributed, Replicated) and distributed.scatter is True


def broadcast_generator(generator: torch.Generator, distributed: Distributed | None) -> None:
    """Give ``generator`` the state of the group's first rank's generator, on every rank.

    Nothing to do in one process (``distributed=None``).
    """
    if distributed is None:
        return
    group = distributed.group
    state = [generator.get_state()]
    src = torch.distributed.get_global_rank(group, 0) if group is not None else 0
    torch.distributed.broadcast_object_list(state, src=src, group=group)
    generator.set_state(state[0])

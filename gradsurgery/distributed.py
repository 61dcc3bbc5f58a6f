r"""Gradient surgery across processes: data-parallel (DDP) and sharded (FSDP2) training.

Every wrapper takes ``distributed=`` one of two layouts; both make every rank apply the
identical update, and neither gathers full gradients.

:class:`Replicated` (``DistributedDataParallel``): every rank holds the whole gradient of
its own batch. DDP averages ``.grad`` (row 0) during the task's backward pass; the extra
rows (constraints, objectives) are filled under ``ddp_model.no_sync()`` and the wrapper
averages them itself, in **one** all-reduce over the contiguous ``(t, p)`` block, before
the surgery. Each rank then holds the gradients one process would have on the union of
the batches, and computes the same step from the same numbers.

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
(under a GradScaler) or raises identically, with no further collective. Random orders
(PCGrad, GradVac) are drawn from a generator whose state is broadcast from the group's
first rank when the wrapper is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from gradsurgery.flat import GradientBank

__all__ = ["Distributed", "Replicated", "Sharded", "check"]


@dataclass(frozen=True)
class Replicated:
    """Data-parallel layout (DDP): each rank holds the whole gradient of its own batch.

    Attributes:
        group: the process group to average over (default: the world).
    """

    group: ProcessGroup | None = None

    def average_rows(self, bank: GradientBank, rows: slice) -> None:
        """Average ``rows`` of every block of ``bank`` over the group, in place.

        One all-reduce per dtype block (one in all for a single-dtype model). The rows are
        divided by the group's size before the sum, as DDP does, so no row overflows.
        """
        world = torch.distributed.get_world_size(self.group)
        for block in bank.blocks:
            part = block[rows]
            part.div_(world)
            torch.distributed.all_reduce(part, group=self.group)

    def reduce_gram(self, gram: Tensor) -> Tensor:
        """The Gram matrix of the whole gradients: already global here, returned as is."""
        return gram


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


Distributed = Union[Replicated, Sharded]  # noqa: UP007 (a runtime alias on Python 3.10)


def check(distributed: object) -> None:
    """Raise unless ``distributed`` is ``None`` or a layout usable in this process.

    Raises:
        TypeError: not ``None``, :class:`Replicated` or :class:`Sharded`.
        RuntimeError: the default process group is not initialised.
    """
    if distributed is None:
        return
    if not isinstance(distributed, (Replicated, Sharded)):
        raise TypeError(
            "distributed must be None, gradsurgery.distributed.Replicated(group) or "
            f"gradsurgery.distributed.Sharded(group), got {type(distributed).__name__}"
        )
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "distributed= needs an initialised process group: call "
            "torch.distributed.init_process_group(...) before building the wrapper"
        )


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

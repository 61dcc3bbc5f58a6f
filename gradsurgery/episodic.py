r"""Episodic memories for continual learning: what GEM and A-GEM remember of past tasks.

A memory stores items of any type (a pair of tensors, a dict, an index into a dataset)
labelled by the task they came from, and draws batches from them. It never looks inside
an item: collate a batch as the model needs it.

* :class:`RingMemory` keeps the last ``per_task`` items of every task, as Lopez-Paz &
  Ranzato (2017) do (256 per task in their experiments). GEM's constraint ``k`` is the
  loss on task ``k``'s memory: :meth:`RingMemory.items`.
* :class:`ReservoirMemory` keeps ``capacity`` items of the whole stream, each item seen
  so far being kept with the same probability ``capacity / n`` (reservoir sampling,
  Vitter 1985), as Chaudhry et al. (2019) do for experience replay.

Both draw batches without replacement (:meth:`~RingMemory.sample`) from one task or from
the whole memory: A-GEM's single reference gradient comes from a batch drawn across every
task's memory. With a ``seed`` every draw is reproducible, and :meth:`~RingMemory.state_dict`
(items, counters and the generator's state) resumes a run exactly.

.. code-block:: python

    memory = RingMemory(per_task=256, seed=0)
    opt = GEMProjector(torch.optim.SGD(model.parameters(), lr=0.1), constraints=0)
    for task, stream in enumerate(tasks):
        for x, y in stream:
            opt.zero_grad()
            loss(model, x, y).backward()
            for past in memory.tasks:
                with opt.constraint(str(past)):
                    loss(model, *collate(memory.items(past))).backward()
            opt.step()
            memory.add(task, list(zip(x, y)))
        opt.add_constraint(str(task))
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import torch

from gradsurgery.checks import positive_int

__all__ = ["ReservoirMemory", "RingMemory"]

T = TypeVar("T")


def _generator(seed: int | None) -> torch.Generator:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be None or an int ≥ 0, got {seed!r}")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class _Memory(Generic[T]):
    """What both memories share: the draws and the generator."""

    def __init__(self, seed: int | None) -> None:
        self.generator = _generator(seed)

    def __len__(self) -> int:
        return len(self.items())

    @property
    def tasks(self) -> list[Hashable]:
        """The tasks that have items in the memory, in the order they first came."""
        raise NotImplementedError

    def items(self, task: Hashable | None = None) -> list[T]:
        """The items of ``task`` (``None``: of every task), in the order they are stored."""
        raise NotImplementedError

    def sample(self, batch_size: int, task: Hashable | None = None) -> list[T]:
        """``batch_size`` distinct items drawn at random from ``task`` (``None``: from all).

        All of them, shuffled, if there are fewer.

        Raises:
            ValueError: a bad ``batch_size``, or no item to draw from.
        """
        positive_int(batch_size, "batch_size")
        pool = self.items(task)
        if not pool:
            where = "the memory" if task is None else f"task {task!r}"
            raise ValueError(f"no item stored for {where}; the tasks are {self.tasks}")
        chosen = torch.randperm(len(pool), generator=self.generator)[:batch_size]
        return [pool[k] for k in chosen.tolist()]


class RingMemory(_Memory[T]):
    """The last ``per_task`` items of every task (GEM's episodic memory).

    Args:
        per_task: items kept per task; an older item of the task makes room for a newer one.
        seed: seed of the draws of :meth:`sample` (``None``: not reproducible).

    Raises:
        ValueError: a bad ``per_task`` or ``seed``.
    """

    def __init__(self, per_task: int, *, seed: int | None = None) -> None:
        self.per_task = positive_int(per_task, "per_task")
        self._rings: dict[Hashable, deque[T]] = {}
        super().__init__(seed)

    @property
    def tasks(self) -> list[Hashable]:
        """The tasks that have items in the memory, in the order they first came."""
        return list(self._rings)

    def items(self, task: Hashable | None = None) -> list[T]:
        """The items of ``task`` (``None``: of every task), oldest first."""
        if task is None:
            return [item for ring in self._rings.values() for item in ring]
        return list(self._rings.get(task, ()))

    def add(self, task: Hashable, items: Sequence[T]) -> None:
        """Store ``items`` of ``task``, dropping the task's oldest items beyond ``per_task``."""
        self._rings.setdefault(task, deque(maxlen=self.per_task)).extend(items)

    def state_dict(self) -> dict[str, Any]:
        """The stored items per task and the generator's state (for ``torch.save``)."""
        rings = {task: list(ring) for task, ring in self._rings.items()}
        return {"items": rings, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state that does not fit raises ``ValueError``, unloaded."""
        rings = state.get("items")
        if not isinstance(rings, Mapping) or not all(isinstance(r, list) for r in rings.values()):
            raise ValueError("the state must hold 'items', a mapping of tasks to lists of items")
        if any(len(ring) > self.per_task for ring in rings.values()):
            raise ValueError(
                f"the state holds more than per_task={self.per_task} items of a task: it was "
                "saved from a RingMemory with a larger per_task"
            )
        self.generator.set_state(state["generator"])
        self._rings = {task: deque(ring, maxlen=self.per_task) for task, ring in rings.items()}


class ReservoirMemory(_Memory[T]):
    """``capacity`` items of the whole stream, each seen item kept with equal probability.

    Reservoir sampling: the ``n``-th item seen (counting from 1) is stored if the memory
    is not full, else it replaces a stored item drawn uniformly with probability
    ``capacity / n``. After ``n ≥ capacity`` items, every one of them is in the memory
    with probability ``capacity / n``, whatever its task.

    Args:
        capacity: items kept in all.
        seed: seed of the replacements and of :meth:`sample` (``None``: not reproducible).

    Raises:
        ValueError: a bad ``capacity`` or ``seed``.
    """

    def __init__(self, capacity: int, *, seed: int | None = None) -> None:
        self.capacity = positive_int(capacity, "capacity")
        self.seen = 0
        self._slots: list[tuple[Hashable, T]] = []
        super().__init__(seed)

    @property
    def tasks(self) -> list[Hashable]:
        """The tasks that have items in the memory, in the order of their first slot."""
        return list(dict.fromkeys(task for task, _ in self._slots))

    def items(self, task: Hashable | None = None) -> list[T]:
        """The items of ``task`` (``None``: of every task), in slot order."""
        return [item for owner, item in self._slots if task is None or owner == task]

    def add(self, task: Hashable, items: Sequence[T]) -> None:
        """Offer ``items`` of ``task`` to the reservoir, one after the other."""
        for item in items:
            self.seen += 1
            if len(self._slots) < self.capacity:
                self._slots.append((task, item))
                continue
            j = int(torch.randint(self.seen, (1,), generator=self.generator))
            if j < self.capacity:
                self._slots[j] = (task, item)

    def state_dict(self) -> dict[str, Any]:
        """The slots, the number of items seen and the generator's state."""
        return {
            "slots": list(self._slots),
            "seen": self.seen,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state that does not fit raises ``ValueError``, unloaded."""
        slots, seen = state.get("slots"), state.get("seen")
        if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
            raise ValueError(f"the state must hold 'seen', an int ≥ 0, got {seen!r}")
        if not isinstance(slots, list) or not all(
            isinstance(slot, tuple) and len(slot) == 2 for slot in slots
        ):
            raise ValueError("the state must hold 'slots', a list of (task, item) pairs")
        if len(slots) != min(seen, self.capacity):
            raise ValueError(
                f"the state holds {len(slots)} items after {seen} seen, but a reservoir of "
                f"capacity={self.capacity} holds {min(seen, self.capacity)}"
            )
        self.generator.set_state(state["generator"])
        self._slots, self.seen = list(slots), seen

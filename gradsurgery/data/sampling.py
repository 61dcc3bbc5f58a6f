"""A random memory batch for every step."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar, cast

import torch

from gradsurgery.checks import positive_int

__all__ = ["DEFAULT_BATCH_SIZE", "MemoryBatches", "sample_batch"]

T = TypeVar("T")
B = TypeVar("B")

DEFAULT_BATCH_SIZE = 16
"""Memory batch size of both papers: 16 for MLM and XSR (Liu et al., 2021, Appendix A),
16 sentence pairs for the alignment loss (seed 004)."""


def sample_batch(
    items: Sequence[T],
    batch_size: int = DEFAULT_BATCH_SIZE,
    generator: torch.Generator | None = None,
) -> list[T]:
    """``batch_size`` distinct items drawn at random (all of them, shuffled, if fewer).

    Each call draws afresh, as seed 004 samples its alignment batch at every step; pass a
    seeded ``torch.Generator`` for a reproducible sequence of batches.

    Raises:
        ValueError: no item, or a bad ``batch_size``.
    """
    positive_int(batch_size, "batch_size")
    if not items:
        raise ValueError("no item to sample from")
    chosen = torch.randperm(len(items), generator=generator)[:batch_size]
    return [items[index] for index in chosen.tolist()]


def _to_device(batch: B, device: torch.device) -> B:
    move = getattr(batch, "to", None)
    if callable(move):
        return cast(B, move(device))
    if isinstance(batch, Mapping):
        return cast(B, {key: value.to(device) for key, value in batch.items()})
    raise TypeError(f"cannot move a {type(batch).__name__} to {device}: it has no .to()")


class MemoryBatches(Generic[T, B]):
    """An endless stream of memory batches, each drawn afresh from a dataset.

    Every :meth:`sample` (or ``next()``) draws ``batch_size`` distinct items at random,
    collates them and moves the batch to ``device``: the "batch of data samples from the
    MLM and XSR tasks" of each iteration in Liu et al. (2021), or seed 004's alignment
    batch.

    .. code-block:: python

        collator = DataCollatorForLanguageModeling(tokenizer, seed=0)
        memory = MemoryBatches(text_examples(tokenizer, read_text("wiki.en")), collator, seed=0)
        pairs = MemoryBatches(read_parallel("ep.en", "ep.es", "ep.align"),
                              ParallelCollator(tokenizer), seed=0)
        mlm_batch, pair_batch = memory.sample(), next(pairs)

    Args:
        items: the dataset (any sequence, e.g. a list or a ``datasets.Dataset``).
        collate: turns a list of items into a batch (a transformers collator,
            :class:`~gradsurgery.data.ParallelCollator`, …).
        batch_size: items per batch (16 in both papers).
        seed: seed of the draws (``None``: the global generator). A seeded collator, such
            as ``DataCollatorForLanguageModeling(seed=…)``, makes the masks reproducible too.
        device: where batches go (``None``: left where ``collate`` puts them).

    :meth:`state_dict` holds the draws' generator, so a resumed run draws the same
    batches (a collator's own random state is not in it).

    Raises:
        ValueError: no item or a bad ``batch_size``.
    """

    def __init__(
        self,
        items: Sequence[T],
        collate: Callable[[list[T]], B],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.batch_size = positive_int(batch_size, "batch_size")
        if len(items) == 0:
            raise ValueError("no item to sample memory batches from")
        self.items = items
        self.collate = collate
        self.device = None if device is None else torch.device(device)
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> B:
        """A fresh batch."""
        batch = self.collate(sample_batch(self.items, self.batch_size, self.generator))
        return batch if self.device is None else _to_device(batch, self.device)

    def __iter__(self) -> Iterator[B]:
        return self

    def __next__(self) -> B:
        return self.sample()

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (empty without a seed)."""
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if it does not fit this stream."""
        if (self.generator is None) != ("generator" not in state):
            raise ValueError("the state was saved from a stream with a different seed setting")
        if self.generator is not None:
            self.generator.set_state(state["generator"])

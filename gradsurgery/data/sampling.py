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
16 sentence pairs for the alignment loss (Efimov et al., 2022)."""


def sample_batch(
    items: Sequence[T],
    batch_size: int = DEFAULT_BATCH_SIZE,
    generator: torch.Generator | None = None,
) -> list[T]:
    """``batch_size`` distinct items drawn at random (all of them, shuffled, if fewer).

    Each call draws afresh, as Efimov et al. (2022) sample their alignment batch at every
    step; pass a seeded ``torch.Generator`` for a reproducible sequence of batches.

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


_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: seeds of neighbouring positions differ widely


class MemoryBatches(Generic[T, B]):
    """An endless stream of memory batches, each drawn afresh from a dataset.

    Batch ``k`` holds ``batch_size`` distinct items drawn at random, collated and moved to
    ``device``: the "batch of data samples from the MLM and XSR tasks" of each iteration in
    Liu et al. (2021), or the alignment batch of Efimov et al. (2022). With a ``seed``,
    batch ``k`` depends only on ``(seed, k)``: both the draw and the collator's use of
    torch's global random generator (``DataCollatorForLanguageModeling``'s masking when the
    collator has no seed of its own) are seeded from them, so a run resumed at position ``k``
    sees the same batches as an uninterrupted one.

    .. code-block:: python

        memory = MemoryBatches(text_examples(tokenizer, read_text("wiki.en")),
                               DataCollatorForLanguageModeling(tokenizer), seed=0)
        pairs = MemoryBatches(read_parallel("ep.en", "ep.es", "ep.align"),
                              ParallelCollator(tokenizer), seed=0)
        mlm_batch, pair_batch = memory.sample(), pairs.sample()

    :meth:`sample` returns the batch at the stream's position and advances it;
    :meth:`at` returns any position's batch; iterating (``for batch in memory``) starts a
    fresh endless stream at position 0, so the object can be cycled by a training loop.

    Args:
        items: the dataset (any sequence, e.g. a list or a ``datasets.Dataset``).
        collate: turns a list of items into a batch (a transformers collator,
            :class:`~gradsurgery.data.ParallelCollator`, …).
        batch_size: items per batch (16 in both papers).
        seed: seed of the stream (``None``: torch's global generator, not reproducible
            by position).
        device: where batches go (``None``: left where ``collate`` puts them).

    Raises:
        ValueError: no item, a bad ``batch_size`` or a bad ``seed``.
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
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or an int ≥ 0, got {seed!r}")
        self.items = items
        self.collate = collate
        self.seed = seed
        self.device = None if device is None else torch.device(device)
        self.position = 0

    def at(self, position: int) -> B:
        """The batch at ``position`` (≥ 0) of the stream; the stream's position is unchanged."""
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"position must be an int ≥ 0, got {position!r}")
        if self.seed is None:
            batch = self.collate(sample_batch(self.items, self.batch_size))
        else:
            step_seed = (self.seed * _MIX + position) % 2**63
            generator = torch.Generator().manual_seed(step_seed)
            chosen = sample_batch(self.items, self.batch_size, generator)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_seed)
                batch = self.collate(chosen)
        return batch if self.device is None else _to_device(batch, self.device)

    def sample(self) -> B:
        """The batch at the current position; the position then moves on by one."""
        batch = self.at(self.position)
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[B]:
        position = 0
        while True:
            yield self.at(position)
            position += 1

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (what :meth:`sample` draws next)."""
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if it holds no valid position."""
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"the state must hold a position ≥ 0, got {position!r}")
        self.position = position

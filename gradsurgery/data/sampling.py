"""A random memory batch for every step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from gradsurgery.checks import positive_int

__all__ = ["DEFAULT_BATCH_SIZE", "sample_batch"]

T = TypeVar("T")

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

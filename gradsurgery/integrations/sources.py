"""Where the extra gradients come from in a training loop: batches and a loss, by name.

A :class:`LossSource` pairs an iterable of batches with the loss to compute on them, e.g. a
masked-LM loss on memory text for a GEM constraint, or the task loss on another language's
batches for an LF-MLF objective. A :class:`BatchCycle` draws its batches by position in the
endless stream ``batches`` repeated, so that the batch drawn at a given position is the same
in an uninterrupted run and in one resumed from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

__all__ = ["BatchCycle", "LossFn", "LossSource", "check_sources"]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss(model, batch) -> Tensor``: a 0-d loss computed with ``model`` on one batch."""


class LossSource(NamedTuple):
    """The batches of one constraint or objective and the loss computed on each.

    Attributes:
        batches: an iterable that can be iterated again and again (a list, a
            ``DataLoader``); it is cycled.
        loss: ``loss(model, batch) -> Tensor``, a 0-d loss that is a mean over the batch.
    """

    batches: Iterable[Any]
    loss: LossFn


def check_sources(sources: Mapping[str, Any]) -> dict[str, LossSource]:
    """``sources`` as ``{name: LossSource}``, or ``ValueError`` saying what is wrong.

    Each value is a :class:`LossSource` or a pair ``(batches, loss)``.
    """
    if not isinstance(sources, Mapping):
        raise ValueError(
            f"sources must map names to (batches, loss) pairs, got {type(sources).__name__}"
        )
    checked = {}
    for name, source in sources.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"source names must be non-empty strings, got {name!r}")
        if not (isinstance(source, tuple) and len(source) == 2):
            raise ValueError(
                f"source {name!r} must be a (batches, loss) pair, got {type(source).__name__}"
            )
        batches, loss = source
        if not isinstance(batches, Iterable):
            raise ValueError(
                f"the batches of source {name!r} must be iterable, got {type(batches).__name__}"
            )
        if isinstance(batches, Iterator):
            raise ValueError(
                f"the batches of source {name!r} are a one-shot iterator "
                f"({type(batches).__name__}); they are cycled, so give an iterable that can be "
                "iterated again, such as a list or a DataLoader"
            )
        if not callable(loss):
            raise ValueError(
                f"the loss of source {name!r} must be callable as loss(model, batch), "
                f"got {type(loss).__name__}"
            )
        checked[name] = LossSource(batches, loss)
    return checked


class BatchCycle:
    """The batches of an iterable, repeated without end, drawn by position.

    :meth:`at` returns the batch at a position of the stream ``batches, batches, …``. Drawing
    forward skips the batches in between (they are loaded, not used); drawing backward
    starts the stream again. A resumed run therefore draws what the uninterrupted run drew,
    provided ``batches`` comes in the same order on each pass (a list, a ``DataLoader``
    without shuffling or shuffled by a seeded ``generator`` of its own).

    Args:
        name: the source's name, for error messages.
        batches: an iterable that can be iterated again.
    """

    def __init__(self, name: str, batches: Iterable[Any]) -> None:
        self.name = name
        self.batches = batches
        self._iterator: Iterator[Any] | None = None
        self.position = 0

    def _next(self) -> Any:
        if self._iterator is not None:
            try:
                return next(self._iterator)
            except StopIteration:
                pass
        self._iterator = iter(self.batches)
        try:
            return next(self._iterator)
        except StopIteration:
            raise ValueError(f"source {self.name!r} has no batch") from None

    def at(self, position: int) -> Any:
        """The batch at ``position`` (≥ 0) of the repeated stream."""
        if position < 0:
            raise ValueError(f"position must be ≥ 0, got {position}")
        if position < self.position:
            self._iterator = None
            self.position = 0
        while self.position < position:
            self._next()
            self.position += 1
        batch = self._next()
        self.position += 1
        return batch

"""Where the extra gradients come from in a training loop: batches and a loss, by name.

A :class:`LossSource` pairs batches with the loss to compute on them, e.g. a masked-LM loss
on memory text for a GEM constraint, or the task loss on another language's batches for an
LF-MLF objective. The batches are either

* an iterable that can be iterated again (a list, a ``DataLoader``): a :class:`BatchCycle`
  draws them by position in the endless stream ``batches`` repeated, so that the batch
  drawn at a given position is the same in an uninterrupted run and in a resumed one; or
* an iterator, e.g. an endless random stream such as ``gradsurgery.data.MemoryBatches``:
  a :class:`BatchStream` draws ``next()``; a resumed run draws what the uninterrupted run
  drew if the iterator has ``state_dict``/``load_state_dict`` (saved with checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

__all__ = ["BatchCycle", "BatchStream", "LossFn", "LossSource", "check_sources", "drawer"]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss(model, batch) -> Tensor``: a 0-d loss computed with ``model`` on one batch."""


class LossSource(NamedTuple):
    """The batches of one constraint or objective and the loss computed on each.

    Attributes:
        batches: an iterable that can be iterated again and again (a list, a
            ``DataLoader``), which is cycled, or an iterator (an endless stream).
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


class BatchStream:
    """The batches of an iterator, drawn with ``next()``.

    Args:
        name: the source's name, for error messages.
        batches: the iterator; it should not end (a source draws a batch every micro-batch).
    """

    def __init__(self, name: str, batches: Iterator[Any]) -> None:
        self.name = name
        self.batches = batches

    def at(self, position: int) -> Any:
        """The iterator's next batch (``position`` is the caller's count, not used)."""
        try:
            return next(self.batches)
        except StopIteration:
            raise ValueError(
                f"the iterator of source {self.name!r} ran out at draw {position}: give an "
                "endless stream, or an iterable (a list, a DataLoader) to cycle"
            ) from None

    @property
    def resumable(self) -> bool:
        """Whether the iterator can save and restore where it is (``state_dict``)."""
        return callable(getattr(self.batches, "state_dict", None)) and callable(
            getattr(self.batches, "load_state_dict", None)
        )

    def state_dict(self) -> Any:
        """The iterator's ``state_dict()``."""
        return self.batches.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: Any) -> None:
        """Restore the iterator with its ``load_state_dict``."""
        self.batches.load_state_dict(state)  # type: ignore[attr-defined]


def drawer(name: str, batches: Iterable[Any]) -> BatchCycle | BatchStream:
    """A :class:`BatchStream` for an iterator, else a :class:`BatchCycle`."""
    if isinstance(batches, Iterator):
        return BatchStream(name, batches)
    return BatchCycle(name, batches)

r"""The two phases of fine-tuning, told apart from the training loss (Guo et al., 2023).

Guo et al., *Analyzing and Reducing the Performance Gap in Cross-Lingual Transfer with
Fine-tuning Slow and Fast* (ACL 2023), find that fine-tuning goes through a first phase P1
in which the training loss drops fast, then a second phase P2 in which it drops slowly.
With the loss :math:`L_t` observed every step and a window of :math:`W` steps (100):

.. math::

    \bar L_a = \operatorname{mean}(L_{t-W+1..t}), \qquad
    \bar L_b = \operatorname{mean}(L_{t-2W+1..t-W}), \qquad
    \varphi = \bar L_a / \bar L_b,

    t \in P_1 \iff \bar L_b - \bar L_a > \delta \quad (\delta = 0.1), \qquad
    R(\varphi) = \max(1 - \varphi^r, 0) \quad (r = 3).

Before :math:`2W` observations both windows are not full yet and the phase is P1.
"""

from __future__ import annotations

import math
from collections import deque
from enum import IntEnum
from numbers import Real
from typing import Any

from torch import Tensor

from gradsurgery.checks import finite_number, positive_int

__all__ = ["Phase", "PhaseDetector", "TwoWindows"]


class Phase(IntEnum):
    """The fine-tuning phase: ``P1`` while the loss drops fast, ``P2`` after."""

    P1 = 1
    P2 = 2


class TwoWindows:
    """The last ``2W`` values of a non-negative signal and the means of its two windows.

    :attr:`means` is ``(recent, previous)``: the mean of the last ``W`` values and of the
    ``W`` before them, or ``None`` until ``2W`` values were pushed. Each is a correctly
    rounded sum (:func:`math.fsum`) divided by ``W``, recomputed from the stored values, so
    a restored state gives the same means bit for bit. Each push costs ``O(W)`` on the host.

    Args:
        window: ``W``, a positive int.
        signal: what the values are (``"loss"``), for error messages.
    """

    def __init__(self, window: int, signal: str) -> None:
        self.window = positive_int(window, "window")
        self.signal = signal
        self.count = 0
        self._values: deque[float] = deque(maxlen=2 * self.window)
        self._means: tuple[float, float] | None = None

    def push(self, value: float | Tensor) -> float:
        """Append ``value`` (a number or a 0-d tensor, read once); return it as a float.

        Raises:
            ValueError: ``value`` is not one number, or is NaN, infinite or negative;
                nothing is changed.
        """
        number = self._to_float(value)
        self._values.append(number)
        self.count += 1
        self._update_means()
        return number

    def _to_float(self, value: object) -> float:
        if isinstance(value, Tensor):
            if value.dim() != 0:
                raise ValueError(
                    f"the {self.signal} must be a number or a 0-d tensor, got a tensor of "
                    f"shape {tuple(value.shape)}"
                )
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(
                f"the {self.signal} must be a number or a 0-d tensor, got {type(value).__name__}"
            )
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise ValueError(
                f"the {self.signal} must be finite and non-negative, got {number}; nothing "
                "was recorded"
            )
        return number

    def _update_means(self) -> None:
        if len(self._values) < 2 * self.window:
            self._means = None
            return
        values = list(self._values)
        previous = math.fsum(values[: self.window]) / self.window
        recent = math.fsum(values[self.window :]) / self.window
        self._means = (recent, previous)

    @property
    def means(self) -> tuple[float, float] | None:
        """``(recent, previous)``: the means of the two windows, or ``None`` before ``2W``."""
        return self._means

    @property
    def last(self) -> float | None:
        """The value pushed last, or ``None`` before the first."""
        return self._values[-1] if self._values else None

    def drop(self) -> float | None:
        """``previous − recent`` (how much the signal fell), ``None`` until ``2W`` values."""
        if self.means is None:
            return None
        recent, previous = self.means
        return previous - recent

    def state_dict(self) -> dict[str, Any]:
        """The window, the number of values pushed and the last ``2W`` values."""
        return {"window": self.window, "count": self.count, "values": list(self._values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state made by :meth:`state_dict` with the same window.

        Raises:
            ValueError: another window, or values that are not a valid history; nothing is
                changed.
        """
        if state.get("window") != self.window:
            raise ValueError(
                f"the {self.signal} history was saved with window {state.get('window')}, "
                f"this one has window {self.window}"
            )
        count, values = state.get("count"), state.get("values")
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not isinstance(values, list)
            or len(values) != min(count, 2 * self.window)
        ):
            raise ValueError(
                f"not a {self.signal} history: expected an int 'count' and a list of the "
                f"last min(count, {2 * self.window}) values"
            )
        numbers = [self._to_float(value) for value in values]
        self.count = count
        self._values = deque(numbers, maxlen=2 * self.window)
        self._update_means()


class PhaseDetector:
    r"""Observe the training loss each step; tell the phase, :math:`\varphi` and :math:`R(\varphi)`.

    .. code-block:: python

        detector = PhaseDetector()           # W = 100, δ = 0.1, r = 3
        for batch in loader:
            loss = model(batch).loss
            detector.observe(loss)           # one host read of the loss
            if detector.phase is Phase.P2:
                print(detector.ratio, detector.adaptive_multiplier)

    The ratio :math:`\varphi = \bar L_a / \bar L_b` takes :math:`0/0 = 1` (a flat zero
    loss) and :math:`x/0 = \infty` for :math:`x > 0`; a loss that rises gives
    :math:`\varphi > 1` and :math:`R(\varphi) = 0`.

    Args:
        window: :math:`W`, the number of steps in each of the two windows (100).
        threshold: :math:`\delta \ge 0`: the phase is P1 while the mean loss fell by more
            than this from the previous window to the recent one (0.1).
        exponent: :math:`r > 0` in :math:`R(\varphi) = \max(1 - \varphi^r, 0)` (3).

    Raises:
        ValueError: a setting outside the allowed range.
    """

    def __init__(self, window: int = 100, threshold: float = 0.1, exponent: float = 3.0) -> None:
        self.threshold = finite_number(threshold, "threshold", low=0.0)
        self.exponent = finite_number(exponent, "exponent", low=0.0, strict=True)
        self._losses = TwoWindows(window, "loss")

    @property
    def window(self) -> int:
        """:math:`W`."""
        return self._losses.window

    @property
    def observations(self) -> int:
        """How many losses were observed."""
        return self._losses.count

    def observe(self, loss: float | Tensor) -> None:
        """Record this step's training loss (a number or a 0-d tensor).

        A tensor is read back to the host once (on an accelerator, this waits for the
        loss to be computed: the decision needs its value).

        Raises:
            ValueError: the loss is not one number, or is NaN, infinite or negative;
                nothing is recorded.
        """
        self._losses.push(loss)

    @property
    def means(self) -> tuple[float, float] | None:
        r"""``(L̄_a, L̄_b)``: the mean loss of the recent and of the previous window."""
        return self._losses.means

    @property
    def phase(self) -> Phase:
        r"""``P1`` before :math:`2W` observations and while :math:`\bar L_b - \bar L_a > \delta`."""
        drop = self._losses.drop()
        return Phase.P1 if drop is None or drop > self.threshold else Phase.P2

    @property
    def ratio(self) -> float | None:
        r""":math:`\varphi = \bar L_a / \bar L_b`, or ``None`` before :math:`2W` observations."""
        if self.means is None:
            return None
        recent, previous = self.means
        if previous == 0:
            return 1.0 if recent == 0 else math.inf
        return recent / previous

    @property
    def adaptive_multiplier(self) -> float | None:
        r""":math:`R(\varphi) = \max(1 - \varphi^r, 0)`; ``None`` before :math:`2W` observations."""
        ratio = self.ratio
        if ratio is None:
            return None
        # φ ≥ 1 gives φ^r ≥ 1, and a huge φ would overflow the power.
        return 0.0 if ratio >= 1 else 1.0 - ratio**self.exponent

    def state_dict(self) -> dict[str, Any]:
        """The loss history (the last ``2W`` losses and how many were observed)."""
        return self._losses.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loss history saved by :meth:`state_dict` from a detector with this window.

        The threshold and exponent stay this detector's.

        Raises:
            ValueError: the history was saved with another window or is not valid; nothing
                is changed.
        """
        self._losses.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(window={self.window}, threshold={self.threshold}, "
            f"exponent={self.exponent})"
        )

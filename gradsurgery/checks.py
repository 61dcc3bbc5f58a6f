"""Checks of settings shared by several classes: a ``ValueError`` that says what is allowed."""

from __future__ import annotations

import math
from numbers import Real

__all__ = ["finite_number", "positive_int"]


def positive_int(value: object, name: str) -> int:
    """``value`` if it is an int ≥ 1 (not a bool), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def finite_number(
    value: object, name: str, *, low: float, high: float = math.inf, strict: bool = False
) -> float:
    """``value`` as a float if it is a finite real in ``[low, high]``, else ``ValueError``.

    With ``strict``, ``low`` itself is refused.
    """
    allowed = f"a finite number {'>' if strict else '≥'} {low:g}"
    if high < math.inf:
        allowed += f" and ≤ {high:g}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and low <= number <= high) or (strict and number == low):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number

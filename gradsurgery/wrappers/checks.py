"""Arguments every gradient surgery checks when it is built."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch.optim import Optimizer

from gradsurgery.wrappers.wrapped import WrappedOptimizer, check_optimizer

__all__ = ["check_grad_scaler", "check_inner", "row_names"]


def row_names(rows: int | str | Sequence[str], kind: str, minimum: int = 1) -> tuple[str, ...]:
    """The rows' names: ``"0"``, ``"1"``, … for a count; a single string is one name.

    At least ``minimum`` rows (0 or 1) are required.
    """
    if isinstance(rows, bool):
        raise ValueError(f"{kind}s must be a count or names, got {rows!r}")
    if isinstance(rows, int):
        if rows < minimum:
            raise ValueError(f"{kind}s must be at least {minimum}, got {rows}")
        return tuple(str(k) for k in range(rows))
    names = (rows,) if isinstance(rows, str) else tuple(rows)
    if len(names) < minimum or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{kind}s must be a count or non-empty names, got {rows!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{kind} names must be unique, got {names}")
    return names


def check_inner(optimizer: Optimizer, wrapper: str) -> None:
    """Refuse an inner optimizer (or stack) a gradient surgery cannot wrap.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: a stack that already holds a gradient surgery, ``SparseAdam``, or an
            optimizer whose ``step`` requires a closure (L-BFGS).
    """
    check_optimizer(optimizer)
    while isinstance(optimizer, WrappedOptimizer):
        if optimizer.rewrites_grad:
            raise ValueError(
                f"{wrapper} cannot wrap a {type(optimizer).__name__}: both would own the "
                "parameters' .grad; use one gradient surgery per optimizer"
            )
        optimizer = optimizer.optimizer
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise ValueError(
            f"{wrapper} cannot wrap SparseAdam: it needs sparse gradients, but a gradient "
            "surgery keeps dense ones (one flat buffer); wrap Adam or AdamW instead"
        )
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"{wrapper} cannot wrap {type(optimizer).__name__}: its step() requires a closure "
            "and re-evaluates it (L-BFGS several times per step), and every evaluation would "
            "need its own surgery; wrap a first-order optimizer (SGD, Adam, AdamW) instead"
        )


def check_grad_scaler(grad_scaler: object) -> None:
    """Refuse a ``grad_scaler`` that is not a ``torch.amp.GradScaler`` (``None`` is fine)."""
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
        )

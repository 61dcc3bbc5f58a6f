"""How a gradient surgery meets ``torch.amp.GradScaler``.

Every backward pass of a mixed-precision step is scaled by the scaler's factor ``S``: the
task gradient, and the constraint or objective rows too. Before the surgery reads them,
all of them must be divided by ``S`` and checked for overflow, and ``scaler.update()``
must back off when any of them overflowed. ``GradScaler.step(optimizer)`` unscales only
``optimizer.param_groups`` (row 0); for the other rows the wrapper has to know the scaler.

A :class:`~gradsurgery.wrappers.surgery.SurgeryOptimizer` declares
``_step_supports_amp_scaling``, so ``scaler.step(opt)`` hands the scaler to
``opt.step(grad_scaler=scaler)`` (the scaler itself unscales nothing): the wrapper learns
its scaler whether or not it was given one as ``grad_scaler=``. Under a hand-over that
hides the scaler (``GradScaler`` sets ``found_inf`` on the optimizer instead, e.g. when
``accelerate`` wraps ``step``), the wrapper must have been given it.

The per-optimizer stage kept by ``GradScaler`` (ready, unscaled, stepped) has been stable
since torch 1.6; there is no public way to read it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from gradsurgery.flat import GradientBank

if TYPE_CHECKING:
    from gradsurgery.wrappers.wrapped import WrappedOptimizer

__all__ = ["RowsForScaler", "enabled", "mark_overflow", "step_scaler", "unscale"]

GradScaler = torch.amp.GradScaler

# torch warns, at every ``scaler.step(opt)`` of an optimizer that takes the hand-over, that
# the hand-over will change; the warning is addressed to the optimizer's author (here: this
# module, which also accepts the replacement), not to the user stepping it.
warnings.filterwarnings(
    "ignore", message="GradScaler is going to stop passing itself", category=FutureWarning
)


class RowsForScaler:
    """Presents the extra rows to ``GradScaler.unscale_`` as if they were gradients.

    ``GradScaler.unscale_(obj)`` unscales the ``.grad`` of every tensor in
    ``obj.param_groups`` and records overflow for ``GradScaler.update()``, which is exactly
    what the routed rows need: one holder tensor per bank block, whose ``.grad`` is the
    block's rows 1..k (internal rows after them hold unscaled state and are left alone).
    ``columns``: the blocks of this rank's columns of the bank under
    ``Replicated(scatter=True)``, the only ones holding averaged rows (the others hold
    this rank's own, and an overflow found there alone would be this rank's alone).
    """

    def __init__(
        self, bank: GradientBank, rows: int, columns: Sequence[Tensor] | None = None
    ) -> None:
        self.bank = bank
        self.sharded = columns is not None
        holders = []
        for block in bank.blocks if columns is None else columns:
            routed = block[1 : 1 + rows]
            holder = routed.detach()
            holder.grad = routed
            holders.append(holder)
        self.param_groups = [{"params": holders}]


def enabled(scaler: GradScaler | None) -> bool:
    """Whether ``scaler`` is a GradScaler that scales (``enabled=True``)."""
    return scaler is not None and scaler.is_enabled()


def _stack(optimizer: WrappedOptimizer) -> list[WrappedOptimizer]:
    """``optimizer`` and the wrappers around it, innermost first."""
    stack = [optimizer]
    while stack[-1].wrapped_by is not None:
        stack.append(stack[-1].wrapped_by)
    return stack


def _state(scaler: GradScaler, owner: object) -> dict[str, Any] | None:
    state: dict[str, Any] | None = scaler._per_optimizer_states.get(id(owner))
    return state


def step_scaler(optimizer: WrappedOptimizer, given: GradScaler | None) -> GradScaler | None:
    """The GradScaler stepping ``optimizer`` now: ``given`` by ``scaler.step``, or its own.

    Raises:
        RuntimeError: the wrapper was given another scaler than the one stepping it, or a
            scaler steps it without handing itself over and the wrapper was given none.
    """
    own: GradScaler | None = getattr(optimizer, "grad_scaler", None)
    name = type(optimizer).__name__
    stack = _stack(optimizer)
    if given is not None:
        mismatched = own is not None and given is not own
    elif not any("found_inf" in vars(wrapper) for wrapper in stack):
        return own
    elif own is None:
        raise RuntimeError(
            f"a GradScaler steps {name} without handing itself over (e.g. through "
            "accelerate's optimizer wrapper), so the constraint and objective rows would "
            f"stay scaled: pass the scaler as grad_scaler= to {name}; nothing was changed"
        )
    else:  # the stepping scaler has checked row 0 for overflow: it must be ``own``
        mismatched = own.is_enabled() and not any(
            (state := _state(own, wrapper)) and state["found_inf_per_device"] for wrapper in stack
        )
    if mismatched:
        raise RuntimeError(
            f"{name} was given one GradScaler (grad_scaler=) but another one steps it; "
            "use the scaler that scales the backward passes for both (or pass none: "
            "scaler.step(optimizer) hands it over); nothing was changed"
        )
    return given if given is not None else own


def unscale(scaler: GradScaler, optimizer: WrappedOptimizer, rows: RowsForScaler) -> None:
    """Unscale row 0 (unless ``scaler.unscale_`` did) and the routed rows with ``scaler``.

    Raises:
        ValueError: fp16 parameters (``GradScaler`` refuses to unscale fp16 gradients).
        RuntimeError: the rows were already unscaled since the last ``scaler.update()``.
    """
    if any(holder.dtype == torch.float16 for holder in rows.param_groups[0]["params"]):
        raise ValueError(
            "a GradScaler cannot unscale the gradients of fp16 parameters (torch refuses "
            "them): keep the parameters in fp32 and let autocast compute in fp16, or train "
            "fp16 parameters without a GradScaler; nothing was changed"
        )
    stack = _stack(optimizer)
    if not any(
        (state := _state(scaler, wrapper)) and state["stage"] is OptState.UNSCALED
        for wrapper in stack
    ):
        scaler.unscale_(optimizer)
    state = _state(scaler, rows)
    if state is not None and state["stage"] is not OptState.READY:
        raise RuntimeError(
            "the GradScaler already unscaled this optimizer's rows since its last update(): "
            "call scaler.update() after every scaler.step(optimizer), also after one that "
            "raised, before computing the next step's gradients"
        )
    scaler.unscale_(rows)  # type: ignore[arg-type]


def mark_overflow(scaler: GradScaler, rows: RowsForScaler) -> None:
    """Record an overflow for ``scaler.update()`` (which then backs off), after :func:`unscale`."""
    state = _state(scaler, rows)
    assert state is not None
    for found_inf in state["found_inf_per_device"].values():
        found_inf.fill_(1.0)

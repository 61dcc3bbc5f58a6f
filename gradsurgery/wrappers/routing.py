"""Gradient rows that backward passes are routed to: the buffer side of every surgery.

A :class:`RoutingOptimizer` keeps its parameters' gradients in a
:class:`~gradsurgery.flat.GradientBank`: row 0 is what each ``.grad`` points at, rows
1..k are the extra gradients (GEM constraints, per-language objectives), filled by backward
passes run inside :meth:`RoutingOptimizer._route`. It keeps the bank in step with the model
(parameters that change dtype, layout, shape or ``requires_grad`` after wrapping; see
"When the model changes after wrapping" in ``docs/faq.md``) and tracks which rows this step
has filled. What is done with the rows is :class:`~gradsurgery.wrappers.surgery.SurgeryOptimizer`'s.

Extra rows are zeroed lazily: once a step has ended (stepped, skipped under a GradScaler, or
refused with an exception), the next backward routed to a row first clears it, so gradient
accumulation over micro-batches works, and a stale row is never read even if the user
zeroes gradients through the model or the inner optimizer instead of the wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradsurgery import binding
from gradsurgery.flat import GradientBank
from gradsurgery.wrappers.wrapped import WrappedOptimizer

__all__ = ["RoutingOptimizer"]


class RoutingOptimizer(WrappedOptimizer):
    """Base class: an optimizer whose gradients, and extra gradient rows, live in one bank.

    Subclasses set :attr:`row_kind` (what an extra row is, e.g. ``"constraint"``, also the
    name of their public routing method).

    Args:
        optimizer: the inner optimizer; it keeps its parameters, groups and state.
        names: the names of the extra rows users route backward passes to.
        internal_rows: further rows the subclass keeps for itself (e.g. LF-MLF's accumulated
            direction); never routed to, never zeroed.
    """

    row_kind = "row"
    min_rows = 1

    def __init__(self, optimizer: Optimizer, names: tuple[str, ...], internal_rows: int) -> None:
        super().__init__(optimizer)
        self.row_names = names
        self._bank = GradientBank(self._all_params(), 1 + len(names) + internal_rows)
        self._filled = [False] * len(names)
        self._stale = [False] * len(names)
        self._routing = False
        self._broken = False
        self._pending: Any = None  # the step's statistics once its surgery ran
        self._retrying = False
        self._reduced = False  # the rows were averaged across ranks

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its trainable parameters join the flat buffer.

        Raises:
            RuntimeError: the group has trainable parameters and extra rows already hold
                gradients of this step (they would miss the new parameters' part).
        """
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, (list, tuple, set)):
            params = list(params)  # a generator, read once here and once by torch
        if any(isinstance(p, Tensor) and p.requires_grad for p in params):
            binding.refuse_unsafe(
                binding.BankChanges(joined=tuple(p for p in params if p.requires_grad)),
                started=any(self._filled),
                pending=self._pending is not None,
                holds_gradient=self._bank.holds_gradient,
                per_parameter_state=None,
                optimizer_state={},
            )
        param_group["params"] = params
        super().add_param_group(param_group)
        self._sync_bank()

    # -- gradients ---------------------------------------------------------------------

    @property
    def bank(self) -> GradientBank:
        """The flat gradient storage (row 0: ``.grad``; rows 1..k: the extra gradients)."""
        self._sync_bank()
        return self._bank

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def _per_parameter_state(self) -> str | None:
        """What state the wrapper keeps per parameter entry across steps, if any (subclasses)."""
        return None

    def _sync_bank(self, *, discard: bool = False) -> None:
        """Rebuild the flat buffer if the parameters changed (see ``docs/faq.md``).

        With ``discard`` (from :meth:`zero_grad`) this step's gradients are about to be
        cleared, so changes that would invalidate them are allowed.

        Raises:
            RuntimeError: a change that the buffer cannot follow without a wrong step.
        """
        if self._routing:
            return
        params = self._all_params()
        changes = self._bank.changes(params)
        if not changes:
            return
        binding.refuse_unsafe(
            changes,
            started=not discard and any(self._filled),
            pending=not discard and self._pending is not None,
            holds_gradient=(lambda p: False) if discard else self._bank.holds_gradient,
            per_parameter_state=self._per_parameter_state,
            optimizer_state=self.optimizer.state,
        )
        old, self._bank = self._bank, self._bank.rebuilt(params)
        self._bank_rebuilt(old)

    def _bank_rebuilt(self, old: GradientBank) -> None:
        """Carry per-parameter state over to a rebuilt buffer (subclasses)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero ``.grad`` and every routed row in place.

        Each ``.grad`` stays a view into the flat buffer. With ``set_to_none`` (the
        default) every parameter also counts as having no gradient, as after torch's
        ``zero_grad()``: one that no backward pass reaches before the next step (in any
        row) is handed to the inner optimizer as ``None`` and not stepped (no momentum, no
        weight decay). With ``set_to_none=False`` a parameter that had a gradient keeps a
        zero one and is stepped with it, as in torch. Frozen parameters of the groups get
        the same treatment.
        """
        self._sync_bank(discard=True)
        bank = self._bank
        bank.repair()
        extra = slice(0, 1 + len(self.row_names))  # internal rows after them hold state
        bank.zero_(extra)
        bank.mark_row0_zero()
        bank.forget(extra if set_to_none else slice(1, extra.stop))
        for p in self._all_params():
            if not p.requires_grad and p.grad is not None:
                p.grad = None if set_to_none else torch.zeros_like(p.grad)
        self._filled = [False] * len(self.row_names)
        self._stale = [False] * len(self.row_names)
        self._pending = None
        self._retrying = False
        self._reduced = False
        self._broken = False

    def _index(self, name: str | int | None) -> int:
        """The row of ``name`` (a name or an index; may be left out when there is one)."""
        kind = self.row_kind
        if not self.row_names:
            raise ValueError(
                f"this {type(self).__name__} has no {kind}s: add one with add_{kind}(name)"
            )
        if name is None:
            if len(self.row_names) != 1:
                raise ValueError(f"name the {kind}, one of {list(self.row_names)}")
            return 0
        if isinstance(name, int) and 0 <= name < len(self.row_names):
            return name
        if isinstance(name, str) and name in self.row_names:
            return self.row_names.index(name)
        raise ValueError(f"unknown {kind} {name!r}; the {kind}s are {list(self.row_names)}")

    @contextmanager
    def _route(self, index: int) -> Iterator[None]:
        """Send the gradients of backward passes inside the block to extra row ``index``."""
        if self._routing:
            raise RuntimeError("gradient routing blocks do not nest")
        if self._pending is not None:
            if self._bank.repair() == 0:  # .grad untouched: the surgery's result is still there
                raise RuntimeError(
                    "apply_surgery() already ran for this step; compute every gradient before "
                    "it (after a failed inner step, call step() again to retry it, or zero the "
                    "gradients to start a new step)"
                )
            self._end_step()  # the user zeroed .grad since: a new step starts
        self._check_not_broken()
        self._sync_bank()
        if self._stale[index]:
            self._bank.zero_(index + 1)
            self._bank.forget(slice(index + 1, index + 2))
            self._stale[index] = False
        self._routing = True
        try:
            with self._bank.route(index + 1):
                yield
        finally:
            self._routing = False
            self._broken = self._bank.split
        self._filled[index] = True
        self._check_not_broken()

    def _check_not_broken(self) -> None:
        if self._broken:
            raise RuntimeError(
                "a parameter's dtype, device, shape or memory layout changed inside a gradient "
                "routing block; call zero_grad() and compute the step's gradients again"
            )

    def _check_filled(self) -> None:
        missing = [
            name for name, filled in zip(self.row_names, self._filled, strict=True) if not filled
        ]
        if missing:
            kind = self.row_kind
            raise RuntimeError(
                f"no gradient for {kind} {', '.join(map(repr, missing))} since the last step; "
                f"run its backward inside `with optimizer.{kind}(name):`"
            )

    def _end_step(self) -> None:
        """Every row is stale: the next backward into it starts from zero."""
        self._pending = None
        self._retrying = False
        self._reduced = False
        self._filled = [False] * len(self.row_names)
        self._stale = [True] * len(self.row_names)

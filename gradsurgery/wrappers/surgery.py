"""The mechanics every gradient surgery shares.

A :class:`SurgeryOptimizer` is a :class:`~gradsurgery.wrappers.wrapped.WrappedOptimizer`
(groups, state and state dict are the inner optimizer's) that rewrites the gradient:

* every trainable parameter's ``.grad`` is a view into row 0 of a
  :class:`~gradsurgery.flat.GradientBank`; the wrapper's extra gradients (GEM constraints,
  per-language objectives) are rows 1..k, filled by backward passes run inside
  :meth:`SurgeryOptimizer._route`;
* :meth:`SurgeryOptimizer.apply_surgery` rewrites row 0 in place (``step()`` calls it when
  the user has not), then ``step()`` steps the inner optimizer.

Extra rows are zeroed lazily: once a step has ended (stepped, skipped under a GradScaler, or
refused with an exception), the next backward routed to a row first clears it, so gradient
accumulation over micro-batches works, and a stale row is never read even if the user
zeroes gradients through the model or the inner optimizer instead of the wrapper. Only a
step whose inner ``step()`` raised keeps its rewritten ``.grad`` for a retry (see
:meth:`SurgeryOptimizer.step`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradsurgery import binding
from gradsurgery import distributed as _distributed
from gradsurgery.distributed import Distributed
from gradsurgery.flat import GradientBank
from gradsurgery.wrappers import amp, checks, clipping
from gradsurgery.wrappers.wrapped import WrappedOptimizer

__all__ = ["StepStats", "SurgeryOptimizer"]


class StepStats(Protocol):
    """What every wrapper's per-step statistics offer."""

    @property
    def skipped(self) -> bool:
        """Whether the step was skipped (non-finite gradients under a GradScaler)."""
        ...

    def to_dict(self) -> dict[str, float]:
        """The statistics as plain floats (reads them back to the host)."""
        ...


StatsT = TypeVar("StatsT", bound=StepStats)


class SurgeryOptimizer(WrappedOptimizer, Generic[StatsT]):
    """Base class: an optimizer that rewrites ``.grad`` before an inner optimizer steps.

    Subclasses set :attr:`row_kind` (what an extra row is, e.g. ``"constraint"``, also the
    name of their public routing method) and implement :meth:`_surgery`.

    Args:
        optimizer: the inner optimizer; it keeps its parameters, groups and state.
        rows: number, names or one name of the extra gradient rows users route backward
            passes to (constraints, objectives).
        internal_rows: further rows the wrapper keeps for itself (e.g. LF-MLF's accumulated
            direction); never routed to, never unscaled.
        grad_scaler: the ``torch.amp.GradScaler`` used for every backward pass, if any;
            the wrapper unscales its extra rows with it, and a step whose gradients overflow
            is skipped (the scaler then backs off).
        validate: check every step for NaN/Inf gradients and an inexact solve and raise
            before changing anything. On an accelerator this reads a few numbers back to
            the host once per step; ``False`` keeps the step free of host synchronisation.
        distributed: ``None`` (one process), or the layout of the gradients across
            processes: :class:`~gradsurgery.distributed.Replicated` (DDP) or
            :class:`~gradsurgery.distributed.Sharded` (FSDP2); see ``docs/distributed.md``.
        max_grad_norm: clip the rewritten gradient to this 2-norm after the surgery, as
            ``torch.nn.utils.clip_grad_norm_`` does; ``None``: no clipping.
            ``last_grad_norm`` holds the norm before clipping (a 0-d tensor).
    """

    row_kind = "row"
    min_rows = 1
    rewrites_grad = True

    def __init__(
        self,
        optimizer: Optimizer,
        rows: int | str | Sequence[str],
        *,
        internal_rows: int = 0,
        grad_scaler: torch.amp.GradScaler | None = None,
        validate: bool = True,
        distributed: Distributed | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        names = checks.row_names(rows, self.row_kind, self.min_rows)
        _distributed.check(distributed)
        max_grad_norm = clipping.check_max_grad_norm(max_grad_norm)
        super().__init__(optimizer)
        checks.check_inner(optimizer, type(self).__name__)
        checks.check_grad_scaler(grad_scaler)
        self.row_names = names
        self.grad_scaler = grad_scaler
        self.validate = validate
        self.distributed = distributed
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Tensor | None = None
        self._reduced = False
        self._bank = GradientBank(self._all_params(), 1 + len(names) + internal_rows)
        self._scaler_rows = amp.RowsForScaler(self._bank, len(names))
        self._filled = [False] * len(self.row_names)
        self._stale = [False] * len(self.row_names)
        self._routing = False
        self._broken = False
        self._pending: StatsT | None = None
        self._pending_scaler: torch.amp.GradScaler | None = None
        self._retrying = False
        self._step_scaler: torch.amp.GradScaler | None = None
        self.last_stats: StatsT | None = None

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """``GradScaler.step`` hands itself to :meth:`step`, which unscales every row."""
        return True

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._scaler_rows = amp.RowsForScaler(self._bank, len(self.row_names))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        del state["_scaler_rows"]  # views into the bank; rebuilt from the copied bank
        return state

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
        self._scaler_rows = amp.RowsForScaler(self._bank, len(self.row_names))
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

    # -- the step ------------------------------------------------------------------------

    @property
    def reads_host(self) -> bool:
        """Whether a step reads values back to the host (validation or a GradScaler)."""
        return self.validate or amp.enabled(self.grad_scaler)

    @property
    def _scaler_enabled(self) -> bool:
        """Whether the step being computed runs under an enabled GradScaler."""
        return self._step_scaler is not None

    @property
    def _reads_host(self) -> bool:
        """Whether the step being computed may read values back to the host."""
        return self.validate or self._scaler_enabled

    def _mark_overflow(self) -> None:
        """Make the step's GradScaler back off although no row holds an Inf (see ``amp``)."""
        assert self._step_scaler is not None
        amp.mark_overflow(self._step_scaler, self._scaler_rows)

    def _gram(self, *, exact: bool = False) -> Tensor:
        """The Gram matrix of every bank row, made global across ranks when sharded.

        ``exact`` recomputes it without underflow (:func:`gradsurgery.gram.exact_gram`: two
        more passes), for the rare steps where :func:`gradsurgery.gram.underflow_suspected`.
        """
        gram = self._bank.gram(exact=exact)
        if self.distributed is not None:
            gram = self.distributed.reduce_gram(gram)
        return gram

    def _surgery(self) -> StatsT:
        """Rewrite row 0 of the bank from the rows (subclasses); return the step's stats."""
        raise NotImplementedError

    def apply_surgery(self) -> StatsT:
        """Rewrite ``.grad`` now (and clip it to ``max_grad_norm`` if set), before :meth:`step`.

        ``step()`` calls it when you have not; calling it again before ``step()`` returns
        the same statistics without redoing anything. With a GradScaler, the task gradient
        is unscaled first if ``scaler.unscale_(optimizer)`` has not been called.
        """
        return self._apply_surgery(self.grad_scaler)

    def _apply_surgery(self, scaler: torch.amp.GradScaler | None) -> StatsT:
        """:meth:`apply_surgery` under ``scaler``; an exception ends the step (see ``step``)."""
        if self._pending is not None:
            return self._pending
        if self._routing:
            raise RuntimeError("apply_surgery() was called inside a gradient routing block")
        try:
            self._check_filled()
            self._check_not_broken()
            self._sync_bank()
            self._bank.repair()
            if self.distributed is not None and not self._reduced:
                self.distributed.average_rows(self._bank, slice(1, 1 + len(self.row_names)))
                self._reduced = True
            self._step_scaler = scaler if amp.enabled(scaler) else None
            if self._step_scaler is not None:
                amp.unscale(self._step_scaler, self, self._scaler_rows)
            stats = self._surgery()
            self.last_grad_norm = None
            if self.max_grad_norm is not None and not stats.skipped:
                self.last_grad_norm = clipping.clip_(
                    self._bank, self.max_grad_norm, self.distributed
                )
            self._pending = stats
        except BaseException:
            self._end_step()
            raise
        finally:
            self._step_scaler = None
        self._pending_scaler = scaler
        return self._pending

    def _end_step(self) -> None:
        """Every row is stale: the next backward into it starts from zero."""
        self._pending = None
        self._retrying = False
        self._reduced = False
        self._filled = [False] * len(self.row_names)
        self._stale = [True] * len(self.row_names)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], float] | None = None,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> float | None:
        """Apply the surgery (unless :meth:`apply_surgery` did) and step the inner optimizer.

        ``closure``, if given, is called first with gradients enabled, as ``torch.optim``
        optimizers do; it must compute this step's gradients (task and extra).
        ``grad_scaler`` is set by ``scaler.step(optimizer)``: every row is unscaled with it,
        and the step is skipped if any overflowed. If the surgery raises, the step ends
        (nothing changed; the next backward into a row starts from zero). If the inner step
        raises, the rewritten ``.grad`` stays and a second ``step()`` retries the inner step
        without redoing the surgery.

        Raises:
            RuntimeError: ``grad_scaler`` is not the wrapper's own, or :meth:`apply_surgery`
                ran without the GradScaler that steps the optimizer; nothing is stepped.
        """
        scaler = amp.step_scaler(self, grad_scaler)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._pending is not None and amp.enabled(scaler) and self._pending_scaler is not scaler:
            self._end_step()
            raise RuntimeError(
                f"apply_surgery() ran without the GradScaler that steps {type(self).__name__}, "
                "on still scaled gradients: pass the scaler as grad_scaler= to the wrapper; "
                "nothing was stepped, zero the gradients and compute the step again"
            )
        if self._pending is not None and self._retrying and self._bank.repair() > 0:
            self._end_step()  # .grad was zeroed or replaced since: the surgery's result is gone
        surgery_ran_before = self._pending is not None
        stats = self._apply_surgery(scaler)
        if surgery_ran_before:
            self._sync_bank()
        bank = self._bank
        removed = [i for i, p in enumerate(bank.params) if p.grad is None]
        bank.repair()  # a .grad the user replaced (their clipping) is what is stepped
        # Which parameters a rank reached is local; telling the ranks apart would cost a
        # host read, and withholding on one rank only would make the replicas diverge.
        unreached = bank.without_gradient() if self.distributed is None else []
        withheld = sorted({*unreached, *removed})
        if not stats.skipped:
            try:
                with bank.withheld(withheld):
                    self.optimizer.step()
            except BaseException:
                self._retrying = True
                raise
        self.last_stats = stats
        self._end_step()
        return loss

    # -- saving and loading --------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {"rows": list(self.row_names)}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        if list(state.get("rows", [])) != list(self.row_names):
            raise ValueError(
                f"the state dict was saved with rows {state.get('rows')} but this "
                f"{type(self).__name__} has {list(self.row_names)}"
            )

    def _settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"validate": self.validate}
        if self.max_grad_norm is not None:
            settings["max_grad_norm"] = self.max_grad_norm
        if self.distributed is not None:
            settings["distributed"] = self.distributed
        return settings

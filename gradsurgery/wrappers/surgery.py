"""The step every gradient surgery shares.

A :class:`SurgeryOptimizer` is a :class:`~gradsurgery.wrappers.routing.RoutingOptimizer`
(its gradients are row 0 of a flat bank, its constraint or objective gradients rows 1..k;
groups, state and state dict are the inner optimizer's) that rewrites the gradient:
:meth:`SurgeryOptimizer.apply_surgery` rewrites row 0 in place, under the step's
``GradScaler`` if any, then clips it to ``max_grad_norm`` if set; ``step()`` calls it when
the user has not, then steps the inner optimizer, handing it ``None`` for the parameters
that got no gradient, as torch does. Only a step whose inner ``step()`` raised keeps its
rewritten ``.grad`` for a retry (see :meth:`SurgeryOptimizer.step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradsurgery import distributed as _distributed
from gradsurgery.distributed import Distributed, Rows, Sharded
from gradsurgery.wrappers import amp, checks, clipping
from gradsurgery.wrappers.routing import RoutingOptimizer

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


class SurgeryOptimizer(RoutingOptimizer, Generic[StatsT]):
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
        checks.check_inner(optimizer, type(self).__name__)
        checks.check_grad_scaler(grad_scaler)
        super().__init__(optimizer, names, internal_rows)
        self.grad_scaler = grad_scaler
        self.validate = validate
        self.distributed = distributed
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Tensor | None = None
        self._rows_for_scaler: amp.RowsForScaler | None = None
        self._pending: StatsT | None = None
        self._pending_scaler: torch.amp.GradScaler | None = None
        self._step_scaler: torch.amp.GradScaler | None = None
        self.last_stats: StatsT | None = None

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """``GradScaler.step`` hands itself to :meth:`step`, which unscales every row."""
        return True

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_rows_for_scaler"] = None  # views into the bank; rebuilt from the copied bank
        return state

    @property
    def _scaler_rows(self) -> amp.RowsForScaler:
        """The extra rows as ``GradScaler.unscale_`` sees them (rebuilt with the bank)."""
        source = self._rows
        columns = None if source is self._bank else source.blocks
        rows = self._rows_for_scaler
        if rows is None or rows.bank is not self._bank or rows.sharded != (columns is not None):
            rows = amp.RowsForScaler(self._bank, len(self.row_names), columns)
            self._rows_for_scaler = rows
        return rows

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

    def _gram(self, *, exact: bool = False, rows: slice = slice(None)) -> Tensor:
        """The Gram matrix of the bank's ``rows`` (default: all), made global when sharded.

        ``exact`` recomputes it without underflow (:func:`gradsurgery.gram.exact_gram`: two
        more passes), for the rare steps where :func:`gradsurgery.gram.underflow_suspected`.
        """
        gram = self._rows.gram(exact=exact, rows=rows)
        layout = self._layout
        return gram if layout is None else layout.reduce_gram(gram)

    @property
    def _rows(self) -> Rows:
        """The rows the surgery reads: the bank, or this rank's columns of it (scatter)."""
        layout = self._layout
        return self._bank if layout is None else layout.shard(self._bank)

    def _gather(self) -> None:
        """Make row 0 whole on every rank once the surgery wrote its columns of it."""
        layout = self._layout
        if layout is not None:
            layout.gather_row0(self._bank)

    def _any_rank(self, flag: Tensor) -> Tensor:
        """``flag`` (0-d bool) read from :attr:`_rows`, made true wherever any rank's is."""
        layout = self._layout
        return flag if layout is None else layout.any_rank(flag)

    @property
    def _layout(self) -> Distributed | None:
        """:attr:`distributed` with ``Replicated(scatter=None)`` decided for these rows."""
        if self.distributed is None:
            return None
        return self.distributed.resolved(len(self.row_names), can_scatter=self._can_scatter)

    @property
    def _can_scatter(self) -> bool:
        """Whether the surgery can run on a rank's columns (``Replicated(scatter=True)``)."""
        return True

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
            layout = self._layout
            if layout is not None and not self._reduced:
                layout.average_rows(self._bank, slice(1, 1 + len(self.row_names)))
                self._reduced = True
            self._step_scaler = scaler if amp.enabled(scaler) else None
            if self._step_scaler is not None:
                amp.unscale(self._step_scaler, self, self._scaler_rows)
            stats = self._surgery()
            self.last_grad_norm = None
            if self.max_grad_norm is not None and not stats.skipped:
                sharded = self.distributed if isinstance(self.distributed, Sharded) else None
                self.last_grad_norm = clipping.clip_(self._bank, self.max_grad_norm, sharded)
            self._pending = stats
        except BaseException:
            self._end_step()
            raise
        finally:
            self._step_scaler = None
        self._pending_scaler = scaler
        return self._pending

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
        bank = self._bank
        removed: list[int] = []
        if surgery_ran_before:  # else the surgery just repaired .grad and wrote in place
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
            bank.record_step(withheld)
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

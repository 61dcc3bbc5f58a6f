"""``Uniform``: step on the mean of the objectives' gradients (Uniform-MLF)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradsurgery import gram as _gram
from gradsurgery.distributed import Distributed, Rows
from gradsurgery.papers import MAO_2022
from gradsurgery.wrappers import overflow
from gradsurgery.wrappers.multi import Decision, MultiObjectiveOptimizer, ObjectiveStats

__all__ = ["Uniform"]


class Uniform(MultiObjectiveOptimizer):
    r"""Wrap any optimizer so that each step uses :math:`d = \tfrac1T \sum_t g_t`.

    The baseline of Mao et al. (2022) ("Uniform-MLF"): the same as summing the losses,
    but with each objective's gradient in its own row. The direction needs no Gram
    matrix, and by default none is computed: a step reads each row once, to write
    :math:`d` into ``.grad``, and ``last_stats`` holds the weights :math:`1/T` and
    whether the step was skipped (``last_stats.gram`` is ``None``). With ``stats=True``
    the step also computes the Gram matrix of the rows, as the other wrappers do, for
    ``⟨d, g_t⟩``, ``‖d‖`` and ``‖g_t‖`` in ``last_stats`` and its ``to_dict()``.

    Without the Gram matrix the checks read the written ``.grad`` instead of the rows: a
    NaN or :math:`\pm\infty` in any row makes that entry of the mean NaN or infinite
    (every weight is :math:`1/T > 0`, and :math:`\infty - \infty` is NaN), which
    :func:`gradsurgery.gram.combine_checked_` finds while writing. Row 0 held no gradient
    before (the stray-backward check comes first), so a refused step sets it to zero
    again: nothing was changed, as with ``stats=True``. A mean that overflows the
    gradients' dtype although every row is finite is refused too.

    Args:
        optimizer: the inner optimizer.
        objectives: number of objectives, their names, or one name.
        grad_scaler: the ``torch.amp.GradScaler`` scaling every backward pass, if any.
        validate: raise on NaN/Inf gradients and stray backward passes, before changing
            anything (one host read per step on an accelerator; one more when ``.grad``
            was written since ``zero_grad()``, e.g. after ``model.zero_grad()``).
        distributed: ``None``, :class:`~gradsurgery.distributed.Replicated` (DDP) or
            :class:`~gradsurgery.distributed.Sharded` (FSDP2); see ``docs/distributed.md``.
        max_grad_norm: clip the mean to this 2-norm just before the inner step, as
            ``clip_grad_norm_`` does (``None``: no clipping).
        stats: also compute the Gram matrix of the objectives' gradients each step, for
            the statistics of :class:`~gradsurgery.ObjectiveStats` (one more pass over
            the rows; under ``distributed=`` one all-reduce of it).

    Raises:
        TypeError: ``stats`` is not a bool.
    """

    papers = (MAO_2022,)

    stats_prefix = "uniform"

    def __init__(
        self,
        optimizer: Optimizer,
        objectives: int | str | Sequence[str],
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        validate: bool = True,
        distributed: Distributed | None = None,
        max_grad_norm: float | None = None,
        stats: bool = False,
    ) -> None:
        if not isinstance(stats, bool):
            raise TypeError(f"stats must be True or False, got {stats!r}")
        super().__init__(
            optimizer,
            objectives,
            grad_scaler=grad_scaler,
            validate=validate,
            distributed=distributed,
            max_grad_norm=max_grad_norm,
        )
        self.stats = stats

    def _bound(self, norms: Tensor) -> Tensor:
        return norms.new_zeros(())  # convex weights: no entry can overflow

    def _weights(self) -> Tensor:
        t = len(self.row_names)
        return torch.full((t,), 1.0 / t, dtype=torch.float64, device=self._bank.device)

    def _decide(self, gram: Tensor) -> Decision:
        rows = self._objective_rows
        return Decision(self._weights(), gram[rows, rows])

    def _surgery(self) -> ObjectiveStats:
        if self.stats:
            return super()._surgery()
        rows, weights = self._rows, self._weights()
        if not self._reads_host:
            self._bank.forget_row0_zero()
            rows.combine_(weights, accumulate=False, rows=self._objective_rows)
            self._gather()
            return self._result(weights)
        clean = not self.validate or self._bank.row0_zero() or bool(self._row0_read_clean())
        if clean:
            self._bank.forget_row0_zero()
            faults = [~self._write_checked(rows, weights)]
        else:  # the rows are checked without writing: .grad keeps what it holds
            faults = [self._non_finite(rows, self._objective_rows)]
        faults.append(torch.full((), not clean, dtype=torch.bool, device=self._bank.device))
        suspected, stray = self._any_rank(torch.stack(faults)).tolist()
        non_finite = suspected and bool(  # or a chunk's sum of finite values overflowed
            self._any_rank(self._non_finite(rows, 0 if clean else self._objective_rows))
        )
        if clean and (non_finite or stray):
            for block in rows.blocks:
                block[0].zero_()  # the step's columns of row 0, zero before it
        if non_finite:
            if self._scaler_enabled:
                self._mark_overflow()  # every rank backs off, whichever rank's rows held it
                return self._result(torch.zeros_like(weights), skipped=True)
            if bool(self._any_rank(self._non_finite(rows, self._objective_rows))):
                raise overflow.non_finite_error()
            raise overflow.error(rows)
        if stray:
            raise self._stray_backward()
        self._gather()
        return self._result(weights)

    def _write_checked(self, rows: Rows, weights: Tensor) -> Tensor:
        """Write the mean into ``rows``' row 0; 0-d bool: surely finite on these columns."""
        objective = self._objective_rows
        finite = [
            _gram.combine_checked_(block[0], block[objective], weights) for block in rows.blocks
        ]
        return torch.stack(finite).all()

    @staticmethod
    def _non_finite(rows: Rows, which: int | slice) -> Tensor:
        """0-d bool: whether ``which`` rows hold a NaN or Inf (a pass over them)."""
        return ~torch.stack([block[which].isfinite().all() for block in rows.blocks]).all()

    def _result(self, weights: Tensor, *, skipped: bool = False) -> ObjectiveStats:
        return ObjectiveStats(self.row_names, self.stats_prefix, None, weights, skipped=skipped)

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "stats": self.stats}

"""Multi-objective wrappers: one gradient row per objective, combined into ``.grad``.

A :class:`MultiObjectiveOptimizer` keeps one row of the flat gradient buffer per
objective (a source language, a task), filled by the backward passes run inside
``with opt.objective(name):`` (or all at once by :meth:`MultiObjectiveOptimizer.backward`).
Each step a subclass turns the rows' Gram matrix into weights ``w``, and the wrapper writes
``d = Σ_t w_t g_t`` into ``.grad`` (row 0) before the inner optimizer steps (``Uniform``,
whose weights are ``1/T``, computes no Gram matrix unless asked to). Nothing but
the objectives' rows is read: a backward pass run outside every ``objective`` block would
be lost, so with ``validate=True`` it raises instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional
from torch.optim import Optimizer

from gradsurgery import gram as _gram
from gradsurgery.distributed import Distributed
from gradsurgery.wrappers import overflow
from gradsurgery.wrappers.surgery import SurgeryOptimizer

__all__ = ["MultiObjectiveOptimizer", "ObjectiveStats"]


@dataclass(frozen=True)
class ObjectiveStats:
    """What one multi-objective step did, derived on demand; tensors stay on the device.

    Attributes:
        names: the objectives' names, in row order.
        prefix: the method's name, used as the key prefix of :meth:`to_dict`.
        gram: ``(T, T)`` Gram matrix of the objectives' gradients, or ``(n, T, T)`` with one
            per parameter tensor for per-parameter methods; ``None`` when the step computed
            none (``Uniform`` without ``stats=True``): :meth:`to_dict` then gives the
            weights and ``skipped`` only, and :attr:`dots`, :attr:`direction_norm` and
            :attr:`grad_norms` raise ``RuntimeError``.
        weights: ``(T,)`` weights of ``d = Σ_t w_t g_t``, or ``(n, T)`` per parameter tensor.
        skipped: the step was skipped (overflow under a GradScaler, or a Pareto-stationary
            point under the ``"skip"`` policy).
        extras: method-specific values (e.g. ``"stationary"``, ``"min_norm"``).
    """

    names: tuple[str, ...]
    prefix: str
    gram: Tensor | None
    weights: Tensor
    skipped: bool = False
    extras: Mapping[str, Tensor] = field(default_factory=dict)

    def _batched(self) -> tuple[Tensor, Tensor]:
        if self.gram is None:
            raise RuntimeError(
                "this step computed no Gram matrix of the objectives' gradients, so "
                "⟨d, g_t⟩ and the norms are unknown: build Uniform with stats=True to "
                "compute them (one more pass over the objectives' gradients per step)"
            )
        if self.weights.dim() == 1:
            return self.gram.unsqueeze(0), self.weights.unsqueeze(0)
        return self.gram, self.weights

    @property
    def dots(self) -> Tensor:
        """``⟨d, g_t⟩`` per objective (``≥ 0``: ``d`` increases no loss to first order)."""
        K, w = self._batched()
        return (K @ w.unsqueeze(-1)).squeeze(-1).sum(dim=0)

    @property
    def direction_norm(self) -> Tensor:
        """``‖d‖``."""
        K, w = self._batched()
        squared = (w.unsqueeze(-2) @ K @ w.unsqueeze(-1)).sum()
        return squared.clamp(min=0).sqrt()

    @property
    def grad_norms(self) -> Tensor:
        """``‖g_t‖`` per objective."""
        K, _ = self._batched()
        return K.diagonal(dim1=-2, dim2=-1).sum(dim=0).clamp(min=0).sqrt()

    def to_dict(self) -> dict[str, float]:
        """Flat ``{"<method>/...": float}`` for a logger. Reads the values back to the host."""
        out: dict[str, float] = {"skipped": float(self.skipped)}
        if self.gram is not None:
            out["direction_norm"] = float(self.direction_norm)
        out.update({key: float(value) for key, value in self.extras.items()})
        per_row, labels = [], []
        if self.gram is not None:
            per_row, labels = [self.dots, self.grad_norms], ["dot", "grad_norm"]
        if self.weights.dim() == 1:
            per_row.append(self.weights)
            labels.append("weight")
        values = torch.stack([row.double() for row in per_row]).tolist() if per_row else []
        for label, row in zip(labels, values, strict=True):
            out.update(
                {f"{label}/{name}": value for name, value in zip(self.names, row, strict=True)}
            )
        return {f"{self.prefix}/{key}": value for key, value in out.items()}


class Decision(NamedTuple):
    """A subclass's answer for one step (see :meth:`MultiObjectiveOptimizer._decide`)."""

    weights: Tensor
    gram: Tensor
    skip: bool = False
    extras: Mapping[str, Tensor] = MappingProxyType({})


class MultiObjectiveOptimizer(SurgeryOptimizer[ObjectiveStats]):
    """Base class of the wrappers that combine one gradient per objective.

    Subclasses set :attr:`stats_prefix` and implement :meth:`_decide`.

    Args:
        optimizer: the inner optimizer.
        objectives: number of objectives, their names, or one name.
        internal_rows: rows the subclass keeps for itself after the objectives' rows.
        grad_scaler: the ``torch.amp.GradScaler`` scaling every backward pass, if any.
        validate: raise on NaN/Inf gradients, on a backward pass outside every
            ``objective`` block and on an inexact solve, before changing anything (one
            small host read per step on an accelerator).
        distributed: ``None``, :class:`~gradsurgery.distributed.Replicated` (DDP) or
            :class:`~gradsurgery.distributed.Sharded` (FSDP2); see ``docs/distributed.md``.
        max_grad_norm: clip the rewritten gradient to this 2-norm just before the inner
            step, as ``clip_grad_norm_`` does (``None``: no clipping); see ``docs/faq.md``.
    """

    row_kind = "objective"
    stats_prefix = "multi"

    def __init__(
        self,
        optimizer: Optimizer,
        objectives: int | str | Sequence[str],
        *,
        internal_rows: int = 0,
        grad_scaler: torch.amp.GradScaler | None = None,
        validate: bool = True,
        distributed: Distributed | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__(
            optimizer,
            objectives,
            internal_rows=internal_rows,
            grad_scaler=grad_scaler,
            validate=validate,
            distributed=distributed,
            max_grad_norm=max_grad_norm,
        )

    @property
    def objectives(self) -> tuple[str, ...]:
        """The objectives' names."""
        return self.row_names

    def objective(self, name: str | int | None = None) -> AbstractContextManager[None]:
        """Send the gradients of backward passes inside the block to objective ``name``."""
        return self._route(self._index(name))

    def backward(self, losses: Mapping[str, Tensor] | Sequence[Tensor]) -> None:
        """Run one backward pass per objective, each straight into its row.

        ``losses`` maps every objective's name to its loss, or lists the losses in the
        objectives' order. The graph is retained until the last backward pass, so the
        losses may share a forward pass.
        """
        if isinstance(losses, Mapping):
            if set(losses) != set(self.row_names):
                raise ValueError(
                    f"losses are given for {sorted(losses)}, the objectives are "
                    f"{list(self.row_names)}"
                )
            ordered = [losses[name] for name in self.row_names]
        else:
            ordered = list(losses)
            if len(ordered) != len(self.row_names):
                raise ValueError(
                    f"{len(ordered)} losses for {len(self.row_names)} objectives "
                    f"{list(self.row_names)}"
                )
        for index, loss in enumerate(ordered):
            with self._route(index):
                torch.autograd.backward(loss, retain_graph=index < len(ordered) - 1)

    @property
    def _objective_rows(self) -> slice:
        return slice(1, 1 + len(self.row_names))

    def _decide(self, gram: Tensor) -> Decision:
        """Weights for this step from the Gram of every bank row (subclasses)."""
        raise NotImplementedError

    def _after_apply(self) -> None:
        """Update internal state once ``d`` is in row 0 (subclasses)."""

    def _bound(self, norms: Tensor) -> Tensor:
        """A bound of ``|d_i|`` from the objectives' norms alone, before :meth:`_decide`.

        ``inf`` (unknown) by default: the bound from the weights is then read after
        deciding. Methods whose weights are convex override it with 0: each entry of a
        convex combination lies between the rows' entries and cannot overflow.
        """
        return norms.new_full((), torch.inf)

    def _skipped(self, gram: Tensor) -> ObjectiveStats:
        rows = self._objective_rows
        return ObjectiveStats(
            self.row_names,
            self.stats_prefix,
            gram[rows, rows],
            torch.zeros_like(gram[0, rows]),
            skipped=True,
        )

    def _rows_gram(self, *, with_row0: bool, exact: bool = False) -> Tensor:
        """The Gram matrix of every bank row; row 0's entries are zeros unless ``with_row0``.

        Row 0 is overwritten by the step: its products are needed only where a sharded
        step must check it the same way on every rank.
        """
        if with_row0:
            return self._gram(exact=exact)
        return functional.pad(self._gram(exact=exact, rows=slice(1, None)), (1, 0, 1, 0))

    def _row0_clean(self, gram: Tensor, with_row0: bool) -> Tensor:
        """0-d bool: whether row 0 holds no gradient (the stray-backward check).

        No pass over the gradients when the bank knows row 0 is still zero since
        ``zero_grad()`` (:meth:`~gradsurgery.flat.GradientBank.row0_zero`); else one read
        of row 0 (:meth:`_row0_read_clean`), or its entry of a Gram that includes it.
        """
        if with_row0:
            return gram[0, 0] == 0
        if not self.validate or self._bank.row0_zero():
            return torch.ones((), dtype=torch.bool, device=gram.device)
        return self._row0_read_clean()

    def _row0_read_clean(self) -> Tensor:
        """0-d bool: whether row 0 is zero, from one read of it (its smallest and largest)."""
        zero = [torch.ones((), dtype=torch.bool, device=self._bank.device)]
        for block in self._bank.blocks:
            if block.shape[1] > 0:
                zero.extend(extreme == 0 for extreme in torch.aminmax(block[0]))
        return torch.stack(zero).all()

    def _stray_backward(self) -> RuntimeError:
        """The error of a step whose ``.grad`` held a gradient before the surgery."""
        return RuntimeError(
            f"a backward pass outside every `{type(self).__name__}.objective(...)` "
            "block wrote into .grad; it would be lost. Run each loss's backward "
            "inside its objective block (or use .backward(losses)); nothing was changed"
        )

    def _surgery(self) -> ObjectiveStats:
        bank = self._rows
        # a distributed step decides from reduced numbers only: row 0's entry of the Gram
        with_row0 = self.validate and self.distributed is not None
        gram = self._rows_gram(with_row0=with_row0)
        rows = self._objective_rows
        fits = True
        if self._reads_host:
            dtypes = [block.dtype for block in bank.blocks]
            tiny = _gram.underflow_suspected(gram[rows, rows], bank.numel, dtypes)
            bound = self._bound(overflow.norms(gram[rows, rows]))
            finite, clean, fits, tiny = torch.stack(
                [
                    gram.isfinite().all(),
                    self._row0_clean(gram, with_row0),
                    bound <= overflow.limit(bank),
                    tiny,
                ]
            ).tolist()
            if tiny or not finite:  # underflow, or squares above the fp32 range
                gram = self._rows_gram(with_row0=with_row0, exact=True)
                bound = self._bound(overflow.norms(gram[rows, rows]))
                finite, fits = torch.stack(
                    [gram.isfinite().all(), bound <= overflow.limit(bank)]
                ).tolist()
            if not finite:
                if self._scaler_enabled:
                    self._mark_overflow()  # every rank backs off, whichever rank's rows held it
                    return self._skipped(gram)
                raise overflow.non_finite_error()
            if self.validate and not clean:
                raise self._stray_backward()
        generator: torch.Generator | None = getattr(self, "generator", None)
        drawn = None if fits or generator is None else generator.get_state()
        decision = self._decide(gram)
        if not decision.skip:
            if not fits:
                fits = bool(overflow.bound(decision.gram, decision.weights) <= overflow.limit(bank))
            if decision.weights.dim() == 2:
                self._bank.combine_segments_(decision.weights, rows=rows)
            else:
                bank.combine_(decision.weights, accumulate=False, rows=rows)
            self._gather()
            if not fits and not overflow.row0_finite(self._bank):
                self._bank.zero_(0)  # row 0 held no gradient (checked above)
                if generator is not None and drawn is not None:
                    generator.set_state(drawn)  # the step's random orders are drawn again
                if not self._scaler_enabled:
                    raise overflow.error(bank)
                self._mark_overflow()
                return self._skipped(gram)
            self._after_apply()
        return ObjectiveStats(
            self.row_names,
            self.stats_prefix,
            decision.gram,
            decision.weights,
            skipped=decision.skip,
            extras=dict(decision.extras),
        )

    def _param_index(self) -> dict[int, int]:
        """Position of each parameter in the inner optimizer's groups (state-dict keys)."""
        return {id(p): i for i, p in enumerate(self._all_params())}

    def _settings(self) -> dict[str, Any]:
        return {"objectives": list(self.row_names), **super()._settings()}

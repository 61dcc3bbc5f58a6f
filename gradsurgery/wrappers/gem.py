r"""``GEMProjector``: fine-tune without increasing the memory losses (GEM, A-GEM).

Liu et al. (2021), *Preserving Cross-Linguality of Pre-trained Models via Continual
Learning*, fine-tune mBERT/XLM-R with Gradient Episodic Memory (Lopez-Paz & Ranzato, 2017):
at every step the task gradient :math:`g` is replaced by

.. math::

    x = \arg\min_x \tfrac12 \lVert x - g \rVert^2 \quad \text{s.t.} \quad
    \langle x, g_k \rangle \ge 0,\ k = 1..t,

where :math:`g_k` is the gradient of memory objective :math:`k` (masked LM on memory text,
sentence retrieval, alignment, any loss) on a fresh batch. To first order, the step then
increases none of the memory losses. See :mod:`gradsurgery.functional.gem` for the dual
problem that is solved and the A-GEM mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradsurgery import qp, sync
from gradsurgery.distributed import Distributed
from gradsurgery.functional.gem import (
    GEMMode,
    GEMSolution,
    check_options,
    check_solution,
    gem_multipliers,
    raise_non_finite,
)
from gradsurgery.papers import CHAUDHRY_2019, LIU_2021, LOPEZ_PAZ_2017
from gradsurgery.wrappers import overflow
from gradsurgery.wrappers.checks import row_names
from gradsurgery.wrappers.surgery import SurgeryOptimizer

__all__ = ["GEM_MARGIN", "GEMProjector", "GEMStats"]

GEM_MARGIN = 0.5
"""GEM's default memory strength: the value of Lopez-Paz & Ranzato (2017)'s experiments."""


@dataclass(frozen=True)
class GEMStats:
    """What one GEM step did, derived on demand from the step's Gram and dual solution.

    Every tensor attribute stays on the device until read, and costs nothing unless read.

    Attributes:
        names: the constraints' names, in row order.
        gram: the ``(t + 1, t + 1)`` Gram matrix of ``[g; g_1; …; g_t]`` (float64).
        solution: the dual solution (:class:`~gradsurgery.functional.GEMSolution`).
        skipped: the step was skipped (non-finite gradients under a GradScaler).
    """

    names: tuple[str, ...]
    gram: Tensor
    solution: GEMSolution
    skipped: bool = False

    @property
    def projected(self) -> Tensor:
        """0-d bool: whether the gradient was changed (a constraint was violated)."""
        return self.solution.violated & (not self.skipped)

    @property
    def multipliers(self) -> Tensor:
        """The dual variables ``v`` (``x = g + Σ_k v_k g_k``)."""
        return self.solution.v

    @property
    def dots(self) -> Tensor:
        """``⟨g, g_k⟩`` per constraint, before the projection."""
        return self.gram[1:, 0]

    @property
    def dots_after(self) -> Tensor:
        """``⟨x, g_k⟩`` per constraint, after it (``≥ 0`` when projected)."""
        return self.dots + self.gram[1:, 1:] @ self.multipliers

    @property
    def grad_norm(self) -> Tensor:
        """``‖g‖``."""
        return self.gram[0, 0].clamp(min=0).sqrt()

    @property
    def change_norm(self) -> Tensor:
        """``‖x − g‖ = ‖Jᵀv‖``."""
        v = self.multipliers
        return (v @ self.gram[1:, 1:] @ v).clamp(min=0).sqrt()

    @property
    def projected_norm(self) -> Tensor:
        """``‖x‖``."""
        v = self.multipliers
        x_sq = self.gram[0, 0] + 2 * (v @ self.dots) + v @ self.gram[1:, 1:] @ v
        return x_sq.clamp(min=0).sqrt()

    @property
    def kkt_residual(self) -> Tensor:
        """Certificate of the dual solution (0 when nothing was violated).

        See :func:`gradsurgery.qp.kkt_residual`.
        """
        return self.solution.kkt_residual

    @property
    def fallback(self) -> Tensor:
        """0-d bool: whether the exact host solver replaced an uncertified answer.

        Only checked when the step reads the host (``validate`` or a GradScaler).
        """
        return self.solution.fallback

    def to_dict(self) -> dict[str, float]:
        """Flat ``{"gem/...": float}`` for a logger. Reads the values back to the host."""
        scalar_names = (
            "projected",
            "grad_norm",
            "projected_norm",
            "change_norm",
            "kkt_residual",
            "fallback",
        )
        values = torch.stack([getattr(self, name).double() for name in scalar_names]).tolist()
        out = dict(zip(scalar_names, values, strict=True))
        out["skipped"] = float(self.skipped)
        per_row = torch.stack([self.dots, self.dots_after, self.multipliers]).tolist()
        for label, row in zip(("dot", "dot_after", "multiplier"), per_row, strict=True):
            out.update(
                {f"{label}/{name}": value for name, value in zip(self.names, row, strict=True)}
            )
        return {f"gem/{key}": value for key, value in out.items()}


class GEMProjector(SurgeryOptimizer[GEMStats]):
    r"""Wrap any optimizer so that each step projects the gradient as GEM does.

    .. code-block:: python

        opt = GEMProjector(torch.optim.AdamW(model.parameters(), lr=2e-5),
                           constraints=["mlm", "xsr"])
        for batch, memory, pairs in loader:
            opt.zero_grad()
            task_loss(model, batch).backward()       # lands in .grad
            with opt.constraint("mlm"):
                mlm_loss(model, memory).backward()   # lands in the "mlm" row
            with opt.constraint("xsr"):
                xsr_loss(model, pairs).backward()
            opt.step()                               # project .grad, then AdamW steps

    Each ``.grad`` is a view into a flat buffer and each constraint gradient a row of a
    ``(t, p)`` block next to it, so the projection reads the gradients twice (Gram, then
    ``x = g + Jᵀv``) and copies nothing. Gradient accumulation works as usual: several
    backward passes inside the same block add up.

    Args:
        optimizer: the inner optimizer (its groups, state and hyper-parameters are shared:
            LR schedulers work on the wrapper as on it; clip with ``max_grad_norm``).
        margin: GEM's memory strength ``m ≥ 0``: when projecting, every multiplier is at
            least ``m``. Default: 0.5 for ``mode="gem"``, the value the original GEM code
            runs with, and 0 for ``"agem"``, as A-GEM's code. 0 gives the exact projection.
        constraints: number of constraints, their names, or one name (default: one, named
            ``"0"``). 0 (or ``[]``) is allowed: until :meth:`add_constraint` adds one,
            ``step()`` steps the inner optimizer on the unchanged gradient.
        mode: ``"gem"`` (every constraint) or ``"agem"`` (the mean constraint gradient).
            A-GEM as its paper runs it, one reference gradient from a batch sampled across
            the whole memory, is one constraint fed with that batch (either mode).
        solver: dual QP solver: ``"auto"``, ``"closed_form"`` (one constraint),
            ``"enumerate"`` (exact, on the device, no host sync) or a qpsolvers backend
            such as ``"daqp"`` (see ``docs/solvers.md``).
        eps: absolute ridge of the original GEM code (1e-3 there). It makes the projection
            inexact, ``⟨g_k, x⟩ = −eps·v_k`` on active constraints; keep 0.
        grad_scaler: the ``torch.amp.GradScaler`` scaling every backward pass, if any.
        validate: raise on NaN/Inf gradients, and certify the solution (an uncertified
            one is re-solved by DAQP, counted in ``GEMStats.fallback``; ``SolverError`` if
            that fails too), before changing anything (one small host read per step on an
            accelerator). See ``docs/gem.md``.
        distributed: ``None``, :class:`~gradsurgery.distributed.Replicated` (DDP) or
            :class:`~gradsurgery.distributed.Sharded` (FSDP2); see ``docs/distributed.md``.
        max_grad_norm: clip the rewritten gradient to this 2-norm just before the inner
            step, as ``clip_grad_norm_`` does (``None``: no clipping); see ``docs/faq.md``.

    Raises:
        ValueError: bad option values, no trainable parameter, parameters on several
            devices, or an unknown solver.
    """

    papers = (LIU_2021, LOPEZ_PAZ_2017, CHAUDHRY_2019)

    row_kind = "constraint"
    min_rows = 0

    def __init__(
        self,
        optimizer: Optimizer,
        margin: float | None = None,
        *,
        constraints: int | str | Sequence[str] = 1,
        mode: GEMMode = "gem",
        solver: str = "auto",
        eps: float = 0.0,
        grad_scaler: torch.amp.GradScaler | None = None,
        validate: bool = True,
        distributed: Distributed | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        check_options(0.0 if margin is None else margin, mode, eps)
        names = row_names(constraints, self.row_kind, self.min_rows)
        if names:
            qp.resolve_solver(solver, len(names))
        if margin is None:
            margin = GEM_MARGIN if mode == "gem" else 0.0
        super().__init__(
            optimizer,
            constraints,
            grad_scaler=grad_scaler,
            validate=validate,
            distributed=distributed,
            max_grad_norm=max_grad_norm,
        )
        self.margin = float(margin)
        self.mode: GEMMode = mode
        self.solver = solver
        self.eps = float(eps)

    def constraint(self, name: str | int | None = None) -> AbstractContextManager[None]:
        """Send the gradients of backward passes inside the block to constraint ``name``.

        ``name`` is a constraint's name or index; it may be left out when there is one.
        Only this wrapper's parameters are re-routed: a memory loss that also reaches
        parameters outside it (a head with its own optimizer) adds to their ``.grad`` as
        any backward pass does. Use :meth:`backward_constraint` to keep them out.
        """
        return self._route(self._index(name))

    def backward_constraint(
        self, loss: Tensor, name: str | int | None = None, *, retain_graph: bool = False
    ) -> None:
        """Backward of a memory loss into constraint ``name``, reaching only this wrapper.

        The same as ``loss.backward()`` inside ``with opt.constraint(name):``, except that
        the gradient is computed for this wrapper's trainable parameters only
        (``backward(inputs=...)``): parameters outside it keep their ``.grad``. Autograd
        then also skips the parts of the graph that lead only to them.
        """
        with self._route(self._index(name)):
            torch.autograd.backward(loss, inputs=list(self._bank.params), retain_graph=retain_graph)

    def add_constraint(self, name: str) -> None:
        """Add constraint ``name``, e.g. the memory of the task just finished.

        Its row is allocated now: the flat buffer is rebuilt with one more row (``.grad``
        and the other constraints keep their values; for a moment both buffers exist).
        Every later step then needs a backward pass inside ``with opt.constraint(name):``.
        Call it between steps.

        Raises:
            ValueError: ``name`` is not a new non-empty string, or ``solver`` cannot take
                that many constraints (``"closed_form"`` takes one).
            RuntimeError: a step is under way; nothing was changed.
        """
        self._set_constraints(row_names((*self.row_names, name), self.row_kind))

    def remove_constraint(self, name: str | int) -> None:
        """Remove constraint ``name`` (a name or an index) and its row.

        The flat buffer is rebuilt with one row less. Removing the last one leaves a
        wrapper that steps the inner optimizer on the unchanged gradient. Call it between
        steps.

        Raises:
            ValueError: no constraint ``name``, or ``solver`` cannot take the number left.
            RuntimeError: a step is under way; nothing was changed.
        """
        index = self._index(name)
        self._set_constraints(self.row_names[:index] + self.row_names[index + 1 :])

    def _set_constraints(self, names: tuple[str, ...]) -> None:
        """Rebuild the flat buffer with one row per name, carrying the rows kept."""
        if names == self.row_names:
            return
        self._check_can_change(names)
        self._sync_bank()
        old = {name: k for k, name in enumerate(self.row_names)}
        self._bank = self._bank.rebuilt(
            self._all_params(), [old[n] + 1 if n in old else None for n in names]
        )
        self._stale = [n in old and self._stale[old[n]] for n in names]
        self._filled = [False] * len(names)
        self.row_names = names

    def _check_can_change(self, names: tuple[str, ...]) -> None:
        if names:
            qp.resolve_solver(self.solver, len(names))
        if self._routing or self._pending is not None or any(self._filled):
            raise RuntimeError(
                "the constraints cannot change in the middle of a step (a constraint holds "
                "this step's gradient, or apply_surgery() ran); change them between steps, "
                "after step() or zero_grad()"
            )

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        names = row_names(list(state.get("rows", [])), self.row_kind, self.min_rows)
        if names != self.row_names:
            self._check_can_change(names)

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._set_constraints(row_names(list(state["rows"]), self.row_kind, self.min_rows))

    def _surgery(self) -> GEMStats:
        bank = self._rows
        gram = self._gram()
        solution = gem_multipliers(
            gram, self.margin, mode=self.mode, solver=self.solver, eps=self.eps
        )
        skipped = False
        if self._reads_host:
            checked = check_solution(
                gram,
                solution,
                self.margin,
                mode=self.mode,
                solver=self.solver,
                eps=self.eps,
                exact_gram=lambda: self._gram(exact=True),
                n=bank.numel,
                dtypes=[block.dtype for block in bank.blocks],
                validate=self.validate,
            )
            gram, solution = checked.gram, checked.solution
            if not checked.finite and self._scaler_enabled:
                self._mark_overflow()  # every rank backs off, whichever rank's rows held it
                skipped = True
            else:
                if not checked.finite:
                    raise_non_finite()
                rows = slice(1, 1 + len(self.row_names))
                if (
                    checked.violated
                    and checked.bound > overflow.limit(bank)
                    and self._any_rank(overflow.combine_overflows(bank, solution.v, rows))
                ):
                    if not self._scaler_enabled:
                        raise overflow.error(bank)
                    self._mark_overflow()
                    skipped = True
                elif checked.violated:
                    bank.combine_(solution.v, accumulate=True)
                    self._gather()
        elif not sync.host_reads_are_free(bank.device) or bool(solution.violated):
            bank.combine_(solution.v, accumulate=True)
            self._gather()
        return GEMStats(self.row_names, gram, solution, skipped)

    def _settings(self) -> dict[str, Any]:
        return {
            "margin": self.margin,
            "constraints": list(self.row_names),
            "mode": self.mode,
            "solver": self.solver,
            "eps": self.eps,
            **super()._settings(),
        }

"""``ParetoLessForgetting``: LF-MLF, multi-lingual fine-tuning that forgets less."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradsurgery import qp, simplex_qp
from gradsurgery.distributed import Distributed
from gradsurgery.errors import ParetoStationaryError
from gradsurgery.flat import GradientBank, local
from gradsurgery.functional.lfmlf import DEFAULT_SOLVER
from gradsurgery.papers import MAO_2022
from gradsurgery.wrappers.multi import Decision, MultiObjectiveOptimizer

__all__ = ["ParetoLessForgetting"]

OnStationary = Literal["skip", "raise"]


class ParetoLessForgetting(MultiObjectiveOptimizer):
    r"""Wrap any optimizer so that each step follows LF-MLF (Mao et al., 2022).

    .. code-block:: python

        opt = ParetoLessForgetting(torch.optim.AdamW(model.parameters(), lr=2e-5),
                                   objectives=["en", "de", "fr"])
        for batches in loader:                      # one batch per source language
            opt.zero_grad()
            opt.backward({lang: loss(model, b) for lang, b in batches.items()})
            opt.step()                              # .grad ← d = Jᵀw*, then AdamW steps

    Each step solves Problem 2 of the paper (see :mod:`gradsurgery.functional.lfmlf`): the
    common descent direction in the convex hull of the languages' gradients that keeps the
    sum of all updates, ``ḡ``, shortest, i.e. the model closest to the pre-trained one.
    ``ḡ`` accumulates the combined gradients ``d`` (not the optimizer's updates), lives in
    the flat buffer next to the gradients, and is part of ``state_dict``.

    **Pareto stationarity.** The paper stops when Problem 2's feasible set is empty; in
    exact arithmetic it never is (the min-norm point of the gradients' convex hull is
    always feasible), and it shrinks to zero exactly at a Pareto-stationary point. The
    wrapper therefore computes that min-norm point every step and calls the point
    stationary when its norm is at most ``stationarity_tol`` times the largest gradient
    norm. Then, with ``on_stationary="skip"`` (default), the step is skipped: no
    parameter update, ``ḡ`` unchanged, :attr:`stationary` and ``last_stats`` say so; with
    ``"raise"`` a :class:`~gradsurgery.errors.ParetoStationaryError` stops training.

    Args:
        optimizer: the inner optimizer (AdamW in the paper).
        objectives: number of objectives (source languages), their names, or one name.
        solver: qpsolvers backend for Problem 2 (``"daqp"``: exact and fastest measured;
            every solution is polished and certified, see ``docs/lfmlf.md``).
        on_stationary: ``"skip"`` or ``"raise"``.
        stationarity_tol: relative norm of the min-norm point below which a point counts
            as Pareto-stationary (the Gram matrix is accumulated in fp32, which limits how
            small a meaningful value can be).
        grad_scaler: the ``torch.amp.GradScaler`` scaling every backward pass, if any.
        validate: raise on NaN/Inf gradients, stray backward passes and an inexact solve.
        distributed: ``None``, :class:`~gradsurgery.distributed.Replicated` (DDP) or
            :class:`~gradsurgery.distributed.Sharded` (FSDP2); see ``docs/distributed.md``.
        max_grad_norm: clip the rewritten gradient to this 2-norm just before the inner
            step, as ``clip_grad_norm_`` does (``None``: no clipping); see ``docs/faq.md``.

    Each step reads the ``T × T`` problem back to the host (the QP is solved there).
    """

    papers = (MAO_2022,)

    stats_prefix = "lfmlf"

    def __init__(
        self,
        optimizer: Optimizer,
        objectives: int | str | Sequence[str],
        *,
        solver: str = DEFAULT_SOLVER,
        on_stationary: OnStationary = "skip",
        stationarity_tol: float = 1e-4,
        grad_scaler: torch.amp.GradScaler | None = None,
        validate: bool = True,
        distributed: Distributed | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if on_stationary not in ("skip", "raise"):
            raise ValueError(f"on_stationary must be 'skip' or 'raise', got {on_stationary!r}")
        if not (math.isfinite(stationarity_tol) and 0 <= stationarity_tol < 1):
            raise ValueError(f"stationarity_tol must be in [0, 1), got {stationarity_tol}")
        if solver in ("auto", "enumerate", "closed_form"):
            raise ValueError(f"solver must be a qpsolvers backend such as 'daqp', got {solver!r}")
        qp.resolve_solver(solver, 2)
        super().__init__(
            optimizer,
            objectives,
            internal_rows=1,
            grad_scaler=grad_scaler,
            validate=validate,
            distributed=distributed,
            max_grad_norm=max_grad_norm,
        )
        self.solver = solver
        self.on_stationary: OnStationary = on_stationary
        self.stationarity_tol = float(stationarity_tol)
        # ḡ of parameters that left the flat buffer (frozen), by state-dict index, restored
        # when they rejoin: the accumulated direction does not forget them
        self._parked: dict[int, Tensor] = {}

    @property
    def _accumulated_row(self) -> int:
        return 1 + len(self.row_names)

    @property
    def _per_parameter_state(self) -> str | None:
        return "LF-MLF's accumulated direction"

    @property
    def stationary(self) -> bool:
        """Whether the last step found a Pareto-stationary point (and so did not update)."""
        if self.last_stats is None:
            return False
        return bool(self.last_stats.extras["stationary"])

    def accumulated(self) -> Tensor:
        """``ḡ``, the sum of all combined directions so far, flattened in buffer order."""
        return torch.cat([block[self._accumulated_row] for block in self._bank.blocks])

    def _bound(self, norms: Tensor) -> Tensor:
        return norms.new_zeros(())  # convex weights: no entry can overflow

    def _decide(self, gram: Tensor) -> Decision:
        rows = self._objective_rows
        K = gram[rows, rows]
        c = gram[rows, self._accumulated_row]
        hull = simplex_qp.min_norm_weights(K)
        min_norm = (hull.w @ K @ hull.w).clamp(min=0).sqrt()
        largest = K.diagonal().amax().clamp(min=0).sqrt()
        stationary = min_norm <= self.stationarity_tol * largest
        extras = {"stationary": stationary, "min_norm": min_norm}
        if bool(stationary):
            if self.on_stationary == "raise":
                raise ParetoStationaryError(
                    f"Pareto-stationary point: the min-norm point of the objectives' "
                    f"gradients has norm {float(min_norm):.3e} ≤ {self.stationarity_tol:g} × "
                    f"the largest gradient norm {float(largest):.3e}; nothing was changed"
                )
            return Decision(torch.zeros_like(c), K, skip=True, extras=extras)
        solution = simplex_qp.lfmlf_qp(K, c, self.solver)
        if self.validate:
            dtypes = [block.dtype for block in self._bank.blocks]
            tolerance = qp.kkt_tolerance(len(self.row_names), dtypes)
            simplex_qp.raise_if_inexact(solution, "LF-MLF's Problem 2", tolerance)
        return Decision(solution.w, K, extras={**extras, "kkt_residual": solution.kkt_residual})

    def _after_apply(self) -> None:
        for block in self._bank.blocks:
            block[self._accumulated_row].add_(block[0])

    def _bank_rebuilt(self, old: GradientBank) -> None:
        index = self._param_index()
        row = self._accumulated_row
        held = {id(p) for p in self._bank.params}
        before = {id(p) for p in old.params}
        for p, view in zip(old.params, old.row_views(row), strict=True):
            if id(p) not in held and id(p) in index:
                self._parked[index[id(p)]] = view.detach().clone()
        with torch.no_grad():
            for p, view in zip(self._bank.params, self._bank.row_views(row), strict=True):
                if id(p) not in before and index.get(id(p)) in self._parked:
                    view.copy_(self._parked.pop(index[id(p)]))

    def _extra_state(self) -> dict[str, Any]:
        index = self._param_index()
        row = self._accumulated_row
        views = zip(self._bank.params, self._bank.row_views(row), strict=True)
        accumulated = {i: value.clone() for i, value in self._parked.items()}
        accumulated.update({index[id(p)]: view.clone() for p, view in views})
        return {**super()._extra_state(), "accumulated": accumulated}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        super()._check_extra_state(state)
        params = self._all_params()
        for index, value in state.get("accumulated", {}).items():
            if not (0 <= index < len(params)) or value.shape != local(params[index]).shape:
                raise ValueError(
                    f"the state dict's accumulated direction for parameter {index} does not fit "
                    "this optimizer's parameters"
                )

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        params = self._all_params()
        self._bank.zero_(self._accumulated_row)
        views = {
            id(p): v
            for p, v in zip(
                self._bank.params, self._bank.row_views(self._accumulated_row), strict=True
            )
        }
        self._parked = {}
        with torch.no_grad():
            for index, value in state["accumulated"].items():
                view = views.get(id(params[index]))
                if view is None:  # frozen here: kept until it rejoins
                    self._parked[index] = value.detach().clone()
                else:
                    view.copy_(value)

    def _settings(self) -> dict[str, Any]:
        return {
            **super()._settings(),
            "solver": self.solver,
            "on_stationary": self.on_stationary,
            "stationarity_tol": self.stationarity_tol,
        }

"""``MGDA``: step on the min-norm point of the objectives' gradients' convex hull."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradsurgery import qp, simplex_qp
from gradsurgery.distributed import Distributed
from gradsurgery.papers import SENER_2018
from gradsurgery.wrappers.checks import row_names
from gradsurgery.wrappers.multi import Decision, MultiObjectiveOptimizer

__all__ = ["MGDA"]


class MGDA(MultiObjectiveOptimizer):
    r"""Wrap any optimizer so that each step uses MGDA's common descent direction.

    Sener & Koltun (2018): :math:`d = J^\top w^*` with
    :math:`w^* = \arg\min_{w \in \Delta_T} \lVert J^\top w \rVert`, so that
    :math:`\langle d, g_t \rangle \ge \lVert d \rVert^2` for every objective. With up to
    8 objectives the min-norm point is found by exact enumeration on the gradients' device,
    without host synchronisation (``validate=False``).

    Args:
        optimizer: the inner optimizer.
        objectives: number of objectives, their names, or one name.
        solver: ``"auto"``, ``"enumerate"`` or a qpsolvers backend.
        grad_scaler: the ``torch.amp.GradScaler`` scaling every backward pass, if any.
        validate: raise on NaN/Inf gradients and stray backward passes (one host read per
            step on an accelerator).
        distributed: ``None``, :class:`~gradsurgery.distributed.Replicated` (DDP) or
            :class:`~gradsurgery.distributed.Sharded` (FSDP2); see ``docs/distributed.md``.
        max_grad_norm: clip the rewritten gradient to this 2-norm just before the inner
            step, as ``clip_grad_norm_`` does (``None``: no clipping); see ``docs/faq.md``.
    """

    papers = (SENER_2018,)

    stats_prefix = "mgda"

    def __init__(
        self,
        optimizer: Optimizer,
        objectives: int | str | Sequence[str],
        *,
        solver: str = "auto",
        grad_scaler: torch.amp.GradScaler | None = None,
        validate: bool = True,
        distributed: Distributed | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if solver != "auto":
            qp.resolve_solver(solver, len(row_names(objectives, self.row_kind)))
        super().__init__(
            optimizer,
            objectives,
            grad_scaler=grad_scaler,
            validate=validate,
            distributed=distributed,
            max_grad_norm=max_grad_norm,
        )
        self.solver = solver

    def _bound(self, norms: Tensor) -> Tensor:
        return norms.new_zeros(())  # convex weights: no entry can overflow

    def _decide(self, gram: Tensor) -> Decision:
        rows = self._objective_rows
        K = gram[rows, rows]
        solution = simplex_qp.min_norm_weights(K, self.solver)
        return Decision(solution.w, K, extras={"kkt_residual": solution.kkt_residual})

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "solver": self.solver}

"""``MGDA``: step on the min-norm point of the objectives' gradients' convex hull."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradsurgery import qp, simplex_qp
from gradsurgery.distributed import Distributed
from gradsurgery.functional.mgda import (
    DEFAULT_NORMALIZATION,
    Normalization,
    check_normalization,
    normalize_gram,
)
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

    ``normalization`` solves the problem for the gradients divided by ``n_t`` (their norm
    ``"l2"``, their loss ``"loss"``, or both ``"loss+"``) and steps along
    ``d = Σ_t w*_t g_t / n_t``, still a common descent direction; see
    :mod:`gradsurgery.functional.mgda`. The loss-based ones read the losses given to
    :meth:`backward` (one host read per step, to check that they are positive).

    Args:
        optimizer: the inner optimizer.
        objectives: number of objectives, their names, or one name.
        solver: ``"auto"``, ``"enumerate"`` or a qpsolvers backend.
        normalization: ``"none"`` (default: the paper's algorithm), ``"l2"``, ``"loss"``
            or ``"loss+"``. The loss-based ones need :meth:`backward` (not ``objective``
            blocks) and work neither with a ``grad_scaler`` (scaled losses would scale
            ``d``) nor with ``distributed`` (each rank's losses differ).
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
        normalization: Normalization = DEFAULT_NORMALIZATION,
        grad_scaler: torch.amp.GradScaler | None = None,
        validate: bool = True,
        distributed: Distributed | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if solver != "auto":
            qp.resolve_solver(solver, len(row_names(objectives, self.row_kind)))
        check_normalization(normalization)
        if normalization in ("loss", "loss+") and (grad_scaler, distributed) != (None, None):
            raise ValueError(
                f"normalization={normalization!r} divides by the losses, which a grad_scaler "
                "scales and which differ between ranks: use 'l2' or 'none' with "
                "grad_scaler= or distributed="
            )
        super().__init__(
            optimizer,
            objectives,
            grad_scaler=grad_scaler,
            validate=validate,
            distributed=distributed,
            max_grad_norm=max_grad_norm,
        )
        self.solver = solver
        self.normalization = normalization
        self._losses: Tensor | None = None

    def backward(self, losses: Mapping[str, Tensor] | Sequence[Tensor]) -> None:
        """Run one backward pass per objective, as the base class does; keep the losses.

        Their values are what a loss-based ``normalization`` divides by.
        """
        super().backward(losses)
        if isinstance(losses, Mapping):
            losses = [losses[name] for name in self.row_names]
        self._losses = torch.stack([loss.detach().reshape(()).double() for loss in losses])

    def _end_step(self) -> None:
        super()._end_step()
        self._losses = None

    def _bound(self, norms: Tensor) -> Tensor:
        return norms.new_zeros(())  # convex weights: no entry can overflow

    def _decide(self, gram: Tensor) -> Decision:
        rows = self._objective_rows
        K = gram[rows, rows]
        if self.normalization in ("loss", "loss+") and self._losses is None:
            raise RuntimeError(
                f"MGDA(normalization={self.normalization!r}) needs this step's losses: "
                "compute the gradients with opt.backward(losses), not in objective blocks; "
                "nothing was changed"
            )
        normalized, n = normalize_gram(K, self.normalization, self._losses)
        solution = simplex_qp.min_norm_weights(normalized, self.solver)
        w = solution.w if n is None else solution.w / n
        return Decision(w, K, extras={"kkt_residual": solution.kkt_residual})

    def _settings(self) -> dict[str, Any]:
        return {
            **super()._settings(),
            "solver": self.solver,
            "normalization": self.normalization,
        }

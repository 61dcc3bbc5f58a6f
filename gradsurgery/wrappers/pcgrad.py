"""``PCGrad``: project each objective's gradient off the ones it conflicts with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradsurgery.distributed import Distributed, broadcast_generator
from gradsurgery.functional.pcgrad import conflict_orders, pcgrad_coefficients
from gradsurgery.functional.validation import check_reduction
from gradsurgery.papers import YU_2020
from gradsurgery.wrappers.multi import Decision, MultiObjectiveOptimizer

__all__ = ["PCGrad", "default_generator"]


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    """Return ``generator``, or a new CPU generator seeded from the global RNG.

    Seeding from the global RNG keeps runs reproducible under ``torch.manual_seed``.
    """
    if generator is not None:
        if generator.device.type != "cpu":
            raise ValueError(
                f"the generator must be a CPU generator, got one on {generator.device}"
            )
        return generator
    seed = int(torch.randint(2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


class PCGrad(MultiObjectiveOptimizer):
    r"""Wrap any optimizer so that each step uses PCGrad's direction (Yu et al., 2020).

    For each objective, in a random order of the others (drawn each step from
    ``generator``), the parts of its gradient that conflict with another objective's
    original gradient are projected away; ``d`` is the sum (``"sum"``, the paper's) or the
    mean of the results. See :mod:`gradsurgery.functional.pcgrad` for the equations. Runs on
    the Gram matrix without host synchronisation.

    Args:
        optimizer: the inner optimizer.
        objectives: number of objectives, their names, or one name.
        reduction: ``"sum"`` or ``"mean"``.
        generator: CPU ``torch.Generator`` for the orders (saved in ``state_dict``); by
            default one seeded from the global RNG.
        grad_scaler: the ``torch.amp.GradScaler`` scaling every backward pass, if any.
        validate: raise on NaN/Inf gradients and stray backward passes.
        distributed: ``None``, :class:`~gradsurgery.distributed.Replicated` (DDP) or
            :class:`~gradsurgery.distributed.Sharded` (FSDP2); the generator's state
            is then broadcast from the group's first rank.
        max_grad_norm: clip the rewritten gradient to this 2-norm just before the inner
            step, as ``clip_grad_norm_`` does (``None``: no clipping); see ``docs/faq.md``.
    """

    papers = (YU_2020,)

    stats_prefix = "pcgrad"

    def __init__(
        self,
        optimizer: Optimizer,
        objectives: int | str | Sequence[str],
        *,
        reduction: str = "sum",
        generator: torch.Generator | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        validate: bool = True,
        distributed: Distributed | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        check_reduction(reduction)
        generator = default_generator(generator)
        super().__init__(
            optimizer,
            objectives,
            grad_scaler=grad_scaler,
            validate=validate,
            distributed=distributed,
            max_grad_norm=max_grad_norm,
        )
        broadcast_generator(generator, distributed)
        self.reduction = reduction
        self.generator = generator

    def _bound(self, norms: Tensor) -> Tensor:
        # each projected gradient is no longer than the original: ‖d‖ ≤ Σ_t ‖g_t‖, and each
        # of the T·T terms of the product computing d is at most as long as some ‖g_t‖
        return len(norms) * norms.sum()

    def _decide(self, gram: Tensor) -> Decision:
        rows = self._objective_rows
        K = gram[rows, rows]
        t = K.shape[0]
        C = pcgrad_coefficients(K, conflict_orders(t, self.generator))
        weights = C.sum(dim=0)
        if self.reduction == "mean":
            weights = weights / t
        conflicts = (K < 0).triu(diagonal=1).sum()
        return Decision(weights, K, extras={"conflicting_pairs": conflicts})

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "reduction": self.reduction}

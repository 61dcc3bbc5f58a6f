"""``Uniform``: step on the mean of the objectives' gradients (Uniform-MLF)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurgery.papers import MAO_2022
from gradsurgery.wrappers.multi import Decision, MultiObjectiveOptimizer

__all__ = ["Uniform"]


class Uniform(MultiObjectiveOptimizer):
    r"""Wrap any optimizer so that each step uses :math:`d = \tfrac1T \sum_t g_t`.

    The baseline of Mao et al. (2022) ("Uniform-MLF"): the same as summing the losses,
    but with each objective's gradient in its own row, so the statistics show how the
    objectives relate (``⟨d, g_t⟩`` per objective).

    Args:
        optimizer: the inner optimizer.
        objectives: number of objectives, their names, or one name.
        grad_scaler: the ``torch.amp.GradScaler`` scaling every backward pass, if any.
        validate: raise on NaN/Inf gradients and stray backward passes (one host read per
            step on an accelerator).
    """

    papers = (MAO_2022,)

    stats_prefix = "uniform"

    def _bound(self, norms: Tensor) -> Tensor:
        return norms.new_zeros(())  # convex weights: no entry can overflow

    def _decide(self, gram: Tensor) -> Decision:
        rows = self._objective_rows
        t = len(self.row_names)
        weights = torch.full((t,), 1.0 / t, dtype=gram.dtype, device=gram.device)
        return Decision(weights, gram[rows, rows])

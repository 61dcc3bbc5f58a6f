"""``GradVac``: steer each pair of objectives' gradients towards their usual similarity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional
from torch.optim import Optimizer

from gradsurgery.distributed import Distributed, broadcast_generator, scatters
from gradsurgery.flat import GradientBank
from gradsurgery.functional.gradvac import check_beta, gradvac_coefficients
from gradsurgery.functional.pcgrad import conflict_orders
from gradsurgery.papers import WANG_2021
from gradsurgery.wrappers.multi import Decision, MultiObjectiveOptimizer
from gradsurgery.wrappers.pcgrad import default_generator

__all__ = ["GradVac"]

PER_PARAMETER_SCATTER = (
    "GradVac(granularity='parameter') does not run with Replicated(scatter=True): its "
    "per-tensor Gram matrices would cross the ranks' column shards; use Replicated() "
    "(one all-reduce of the rows) or granularity='model'"
)

Granularity = Literal["model", "parameter"]


class GradVac(MultiObjectiveOptimizer):
    r"""Wrap any optimizer so that each step uses GradVac's direction (Wang et al., 2021).

    Every ordered pair of objectives keeps an EMA ``φ̂_ij`` (rate ``beta``) of their
    gradients' cosine; a gradient whose cosine with another objective's falls below the
    target is moved towards it until the cosine equals the target. See
    :mod:`gradsurgery.functional.gradvac` for the equations. With
    ``granularity="parameter"`` each parameter tensor has its own cosines, targets and
    weights (the paper's finer levels); this reads the gradients once more per pair of
    objectives. Runs without host synchronisation.

    Args:
        optimizer: the inner optimizer.
        objectives: number of objectives, their names, or one name.
        beta: EMA rate of the targets, in (0, 1] (the paper's 1e-2).
        granularity: ``"model"`` (one cosine per pair) or ``"parameter"``.
        generator: CPU ``torch.Generator`` for the order of partners (saved in
            ``state_dict``).
        grad_scaler: the ``torch.amp.GradScaler`` scaling every backward pass, if any.
        validate: raise on NaN/Inf gradients, stray backward passes and a combination
            that would overflow the parameters' dtype (GradVac's weights have no a priori
            bound, so this reads one more scalar per step: ``Σ_t |w_t| ‖g_t‖``).
        distributed: ``None``, :class:`~gradsurgery.distributed.Replicated` (DDP) or
            :class:`~gradsurgery.distributed.Sharded` (FSDP2); the generator's state
            is then broadcast from the group's first rank.
        max_grad_norm: clip the rewritten gradient to this 2-norm just before the inner
            step, as ``clip_grad_norm_`` does (``None``: no clipping); see ``docs/faq.md``.
    """

    papers = (WANG_2021,)

    stats_prefix = "gradvac"

    def __init__(
        self,
        optimizer: Optimizer,
        objectives: int | str | Sequence[str],
        *,
        beta: float = 1e-2,
        granularity: Granularity = "model",
        generator: torch.Generator | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        validate: bool = True,
        distributed: Distributed | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        check_beta(beta)
        if granularity not in ("model", "parameter"):
            raise ValueError(f"granularity must be 'model' or 'parameter', got {granularity!r}")
        if granularity == "parameter" and scatters(distributed):
            raise ValueError(PER_PARAMETER_SCATTER)
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
        self.beta = float(beta)
        self.granularity: Granularity = granularity
        self.generator = generator
        self.targets = self._zero_targets()
        self._per_parameter = torch.zeros(0)  # this step's per-parameter Gram (granularity)
        self._next_targets = self.targets

    def _zero_targets(self) -> Tensor:
        t = len(self.row_names)
        leading = (len(self._bank.params),) if self.granularity == "parameter" else ()
        return torch.zeros(*leading, t, t, dtype=torch.float64, device=self._bank.device)

    def _bank_rebuilt(self, old: GradientBank) -> None:
        if self.granularity == "model":
            return
        position = {id(p): i for i, p in enumerate(old.params)}
        targets = self._zero_targets()
        for i, p in enumerate(self._bank.params):
            if id(p) in position:
                targets[i] = self.targets[position[id(p)]]
        self.targets = targets

    def _rows_gram(self, *, with_row0: bool, exact: bool = False) -> Tensor:
        if self.granularity == "model" or exact:
            return super()._rows_gram(with_row0=with_row0, exact=exact)
        # the model's Gram is the sum of the per-parameter ones: one pass gives both
        first = 0 if with_row0 else 1
        per_parameter = self._bank.segment_gram(slice(first, None))
        layout = self._layout
        if layout is not None:
            per_parameter = layout.reduce_gram(per_parameter)
        self._per_parameter = per_parameter[:, 1 - first :, 1 - first :]
        gram = per_parameter.sum(dim=0)
        return gram if with_row0 else functional.pad(gram, (1, 0, 1, 0))

    def _decide(self, gram: Tensor) -> Decision:
        rows = self._objective_rows
        if self.granularity == "model":
            K = gram[rows, rows]
        else:  # from this step's _rows_gram, used once
            K, self._per_parameter = self._per_parameter, torch.zeros(0)
        orders = conflict_orders(len(self.row_names), self.generator)
        C, self._next_targets = gradvac_coefficients(K, self.targets, orders, self.beta)
        return Decision(C.sum(dim=-2), K)

    def _after_apply(self) -> None:
        self.targets = self._next_targets

    @property
    def _can_scatter(self) -> bool:
        return self.granularity == "model"

    def _extra_state(self) -> dict[str, Any]:
        state = {**super()._extra_state(), "generator": self.generator.get_state()}
        if self.granularity == "model":
            return {**state, "targets": self.targets.clone()}
        index = self._param_index()
        return {
            **state,
            "targets": {
                index[id(p)]: self.targets[i].clone() for i, p in enumerate(self._bank.params)
            },
        }

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        super()._check_extra_state(state)
        targets = state.get("targets")
        expected = (
            isinstance(targets, Tensor)
            if self.granularity == "model"
            else isinstance(targets, dict)
        )
        if not expected:
            raise ValueError(
                f"the state dict holds GradVac targets of another granularity than "
                f"{self.granularity!r}"
            )

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        targets = state["targets"]
        if self.granularity == "model":
            self.targets = targets.to(self.targets)
            return
        params = self._all_params()
        position = {id(p): i for i, p in enumerate(self._bank.params)}
        self.targets = self._zero_targets()
        for index, value in targets.items():
            self.targets[position[id(params[index])]] = value.to(self.targets)

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "beta": self.beta, "granularity": self.granularity}

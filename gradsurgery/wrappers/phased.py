r"""``PhasedLR``: fine-tuning slow and fast (Guo et al., ACL 2023).

Guo et al. protect the cross-lingual knowledge of a multilingual encoder's lower layers
("fine-tuning slow") and let its top layers forget the pre-training task ("fine-tuning
fast") by multiplying each weight's learning rate :math:`\eta` by a factor :math:`K` that
depends on its layer set (:mod:`gradsurgery.layers`) and on the phase of fine-tuning
(:mod:`gradsurgery.phases`):

.. math::

    \theta_t = \theta_{t-1} - K \eta \nabla\theta_{t-1}, \qquad
    K = \begin{cases}
        c_1 & t \in P_1,\ \theta \in S_I \quad\text{(policy I)} \\
        R(\varphi(L_t)) & t \in P_2,\ \theta \in S_{II} \quad\text{(policy II)} \\
        c_2 & t \in P_2,\ \theta \in V_{II} \quad\text{(policy IV)} \\
        1 & \text{otherwise (policy III: } V_I \text{ is never slowed down)}
    \end{cases}

with :math:`c_1 = 0.01`, :math:`c_2 = 10` and :math:`R(\varphi) = \max(1 - \varphi^3, 0)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from gradsurgery.checks import finite_number
from gradsurgery.layers import EncoderLayout, LayerSets, SetName
from gradsurgery.papers import GUO_2023
from gradsurgery.phases import Phase, PhaseDetector
from gradsurgery.similarity import CKAMonitor
from gradsurgery.wrappers.wrapped import WrappedOptimizer

__all__ = ["GROUP_KEY", "PhasedLR", "PhasedStats"]

GROUP_KEY = "phased_lr_set"
"""The key of each parameter group that names the set of its parameters."""


@dataclass(frozen=True)
class PhasedStats:
    r"""What one :class:`PhasedLR` step did.

    Attributes:
        observations: how many losses had been observed (the step's :math:`t`).
        phase: :attr:`Phase.P1` or :attr:`Phase.P2`.
        ratio: :math:`\varphi = \bar L_a / \bar L_b` (``None`` before ``2W`` losses).
        adaptive_multiplier: :math:`R(\varphi)` (``None`` before ``2W`` losses).
        multipliers: :math:`K` of each role: ``"S_I"`` (:math:`S_I` without
            :math:`S_{II}`), ``"S_II"``, ``"V_I"`` (:math:`V_I` without :math:`V_{II}`)
            and ``"V_II"``; every other parameter has :math:`K = 1`.
        c2_applied: whether policy IV (:math:`c_2`) applied.
        similarity: the CKA monitor's last similarity (``None`` without a monitor or
            before its first observation).
    """

    observations: int
    phase: Phase
    ratio: float | None
    adaptive_multiplier: float | None
    multipliers: dict[SetName, float]
    c2_applied: bool
    similarity: float | None = None

    def to_dict(self) -> dict[str, float]:
        """Flat ``{"phased/...": float}`` for a logger (``nan`` for what is undefined)."""

        def number(value: float | None) -> float:
            return math.nan if value is None else float(value)

        out = {
            "phase": float(self.phase),
            "ratio": number(self.ratio),
            "adaptive_multiplier": number(self.adaptive_multiplier),
            "c2_applied": float(self.c2_applied),
            "similarity": number(self.similarity),
            **{f"multiplier/{name}": value for name, value in self.multipliers.items()},
        }
        return {f"phased/{key}": value for key, value in out.items()}


class PhasedLR(WrappedOptimizer):
    r"""Wrap any optimizer so that each step scales each set's learning rate by its :math:`K`.

    .. code-block:: python

        opt = PhasedLR(torch.optim.AdamW(model.parameters(), lr=2e-5), model)
        scheduler = get_linear_schedule_with_warmup(opt, 500, 10_000)  # after PhasedLR
        for batch in loader:
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            opt.observe(loss)        # this step's training loss
            opt.step()               # lr × K for this step only
            scheduler.step()
            log(opt.last_stats.to_dict())

    **Learning rate, not gradient.** Just before the inner step each group's ``lr`` is
    multiplied by its :math:`K`, and right after the step (also if it raises) the value
    that was there is put back, unchanged: an LR scheduler's value is the base, and
    :math:`K` never compounds across steps. Scaling the rate, unlike the gradient, acts
    on every optimizer (Adam's update does not change when its gradients are scaled).
    Whatever the inner optimizer multiplies by ``lr`` is scaled with it: AdamW's
    decoupled weight decay, and with momentum the whole step, past gradients included.

    **Groups.** Every inner group gets the key ``"phased_lr_set"`` naming the role of its
    parameters (``"S_I"``, ``"S_II"``, ``"V_I"``, ``"V_II"`` or ``"other"``, see
    :class:`~gradsurgery.layers.LayerSets`). A group whose parameters have several roles
    is replaced, in place, by one group per role, in the order in which the roles first
    appear in it, each with a copy of its settings. Create LR schedulers after
    ``PhasedLR`` (one created before it would not know the new groups: construction
    refuses such a split); :meth:`add_param_group` splits the same way.

    **Observing the loss.** Call :meth:`observe` with the step's training loss before
    :meth:`step` (inside the closure if you use one), whatever the order of wrappers.
    A step without an observation since the last one raises ``RuntimeError`` and changes
    nothing; several observations between two steps (e.g. a step that a ``GradScaler``
    skipped) each enter the windows.

    Args:
        optimizer: the inner optimizer (any ``torch.optim.Optimizer`` but L-BFGS, or a
            wrapper such as :class:`~gradsurgery.GEMProjector`).
        sets: the :class:`~gradsurgery.layers.LayerSets`, or the model to build them from.
        layout: with a model, the layout preset or :class:`EncoderLayout` (detected from
            the names if ``None``).
        c1: policy I's multiplier of :math:`S_I` in P1, in ``[0, 1]`` (0.01; 0 freezes).
        c2: policy IV's multiplier of :math:`V_{II}` in P2, ``≥ 1`` (10); ``None`` switches
            policy IV off (the paper does so for NER).
        window: :math:`W` of the phase detector (100 steps).
        threshold: :math:`\delta` of the phase detector (0.1).
        exponent: :math:`r` of :math:`R(\varphi)` (3).
        similarity: a :class:`~gradsurgery.similarity.CKAMonitor`: if given, :math:`c_2`
            applies only while it reports that the last layers' similarity to the
            pre-trained model is still dropping (feed it with ``opt.similarity.observe``).

    Raises:
        ValueError: a setting outside its range, a layout that does not fit the model, no
            optimized parameter in any set, a group to split that an LR scheduler already
            holds, an L-BFGS inner optimizer, or a second ``PhasedLR`` in the stack; nothing
            is changed.
    """

    papers = (GUO_2023,)

    def __init__(
        self,
        optimizer: Optimizer,
        sets: LayerSets | nn.Module,
        *,
        layout: EncoderLayout | str | None = None,
        c1: float = 0.01,
        c2: float | None = 10.0,
        window: int = 100,
        threshold: float = 0.1,
        exponent: float = 3.0,
        similarity: CKAMonitor | None = None,
    ) -> None:
        self.c1 = finite_number(c1, "c1", low=0.0, high=1.0)
        self.c2 = None if c2 is None else finite_number(c2, "c2 (or None)", low=1.0)
        if similarity is not None and not isinstance(similarity, CKAMonitor):
            raise TypeError(f"similarity must be a CKAMonitor, got {type(similarity).__name__}")
        if similarity is not None and self.c2 is None:
            raise ValueError("similarity decides when c2 applies; it needs c2 (not None)")
        self.detector = PhaseDetector(window, threshold, exponent)
        self.similarity = similarity
        super().__init__(optimizer)
        _check_stack(optimizer)
        if isinstance(sets, nn.Module):
            sets = LayerSets.from_model(sets, layout)
        elif not isinstance(sets, LayerSets):
            raise TypeError(f"sets must be LayerSets or a model, got {type(sets).__name__}")
        elif layout is not None:
            raise ValueError("layout applies when a model is passed, not LayerSets")
        self.sets = sets
        groups = self._labelled(optimizer.param_groups)
        if all(group[GROUP_KEY] == "other" for group in groups):
            raise ValueError(
                "none of the optimizer's parameters is in S_I, S_II, V_I or V_II: the sets "
                "were built from other parameters (another model, or a copy of it)"
            )
        optimizer.param_groups[:] = groups
        self._observed = False
        self.last_stats: PhasedStats | None = None

    # -- groups --------------------------------------------------------------------------

    def _labelled(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``groups`` split so that each holds one role, with the role under ``GROUP_KEY``."""
        labelled = []
        for index, group in enumerate(groups):
            params = group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            by_role: dict[SetName, list[Tensor]] = {}
            for param in params:
                by_role.setdefault(self.sets.role(param), []).append(param)
            if len(by_role) > 1 and "initial_lr" in group:
                raise ValueError(
                    f"parameter group {index} mixes the sets {sorted(by_role)} and must be "
                    "split, but an LR scheduler already holds it ('initial_lr' is set); "
                    "create the scheduler after PhasedLR"
                )
            for role, members in (by_role or {"other": []}).items():
                labelled.append({**group, "params": members, GROUP_KEY: role})
        return labelled

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer, split by role as at construction."""
        count = len(self.param_groups)
        try:
            for group in self._labelled([param_group]):
                self.optimizer.add_param_group(group)
        except Exception:
            del self.param_groups[count:]
            raise

    def _group_roles(self) -> list[SetName]:
        roles = []
        for index, group in enumerate(self.param_groups):
            if GROUP_KEY not in group:
                raise RuntimeError(
                    f"parameter group {index} has no {GROUP_KEY!r}: it was added to the inner "
                    "optimizer directly; add groups through PhasedLR.add_param_group"
                )
            roles.append(group[GROUP_KEY])
        return roles

    # -- the step ------------------------------------------------------------------------

    def observe(self, loss: float | Tensor) -> None:
        """Record this step's training loss (a number or a 0-d tensor, read once).

        Raises:
            ValueError: NaN, infinite, negative, or not one number; nothing is recorded.
        """
        self.detector.observe(loss)
        self._observed = True

    def _current_stats(self) -> PhasedStats:
        detector = self.detector
        phase = detector.phase
        monitor = self.similarity
        c2_applied = (
            phase is Phase.P2 and self.c2 is not None and (monitor is None or monitor.dropping)
        )
        if phase is Phase.P1:
            multipliers: dict[SetName, float] = {
                "S_I": self.c1,
                "S_II": self.c1,
                "V_I": 1.0,
                "V_II": 1.0,
            }
        else:
            adaptive = detector.adaptive_multiplier
            assert adaptive is not None  # P2 needs both windows full
            c2 = self.c2 if c2_applied and self.c2 is not None else 1.0
            multipliers = {"S_I": 1.0, "S_II": adaptive, "V_I": 1.0, "V_II": c2}
        return PhasedStats(
            observations=detector.observations,
            phase=phase,
            ratio=detector.ratio,
            adaptive_multiplier=detector.adaptive_multiplier,
            multipliers=multipliers,
            c2_applied=c2_applied,
            similarity=None if monitor is None else monitor.similarity,
        )

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], float] | None = None,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> float | None:
        """Step the inner optimizer with each group's ``lr`` times its :math:`K`.

        ``closure``, if given, is called first with gradients enabled and may call
        :meth:`observe`. If the inner step raises, the learning rates are restored and the
        observation stays, so a second ``step()`` retries. ``grad_scaler`` is set by
        ``scaler.step(optimizer)`` when a gradient surgery is inside, and passed on to it.

        Raises:
            RuntimeError: no loss observed since the last step, or a group added to the
                inner optimizer directly; nothing is changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._observed:
            raise RuntimeError(
                "no loss observed since the last step: call opt.observe(loss) with this "
                "step's training loss before opt.step()"
            )
        roles = self._group_roles()
        stats = self._current_stats()
        groups = self.param_groups
        base_lrs = [group["lr"] for group in groups]
        try:
            for group, role, lr in zip(groups, roles, base_lrs, strict=True):
                multiplier = stats.multipliers.get(role, 1.0)
                if multiplier != 1.0:
                    group["lr"] = lr * multiplier
            if grad_scaler is None:
                self.optimizer.step()
            else:
                self.optimizer.step(grad_scaler=grad_scaler)  # type: ignore[call-overload]
        finally:
            for group, lr in zip(groups, base_lrs, strict=True):
                group["lr"] = lr
        self._observed = False
        self.last_stats = stats
        return loss

    # -- saving and loading --------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "similarity": None if self.similarity is None else self.similarity.state_dict(),
            "observed": self._observed,
        }

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        PhaseDetector(self.detector.window).load_state_dict(state["detector"])
        saved = state["similarity"]
        if (saved is None) != (self.similarity is None):
            have = "has" if self.similarity is not None else "has no"
            raise ValueError(
                f"the state dict was saved {'without' if saved is None else 'with'} a CKA "
                f"monitor but this PhasedLR {have} one"
            )
        if self.similarity is not None:
            CKAMonitor(self.similarity.window).load_state_dict(saved)

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        if self.similarity is not None:
            self.similarity.load_state_dict(state["similarity"])
        self._observed = bool(state["observed"])

    def _settings(self) -> dict[str, Any]:
        detector = self.detector
        return {
            "c1": self.c1,
            "c2": self.c2,
            "window": detector.window,
            "threshold": detector.threshold,
            "exponent": detector.exponent,
            "similarity": self.similarity,
            "sets": self.sets,
        }


def _check_stack(optimizer: Optimizer) -> None:
    inner = optimizer
    while isinstance(inner, WrappedOptimizer):
        if isinstance(inner, PhasedLR):
            raise ValueError(
                "PhasedLR cannot wrap another PhasedLR: their multipliers would compound"
            )
        inner = inner.optimizer
    if isinstance(inner, torch.optim.LBFGS):
        raise ValueError(
            "PhasedLR cannot wrap L-BFGS: it has one parameter group and evaluates the "
            "closure inside its step, so there is no per-set learning rate to scale"
        )

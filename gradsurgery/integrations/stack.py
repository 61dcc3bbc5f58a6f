"""Which gradsurgery wrappers an optimizer holds, and which rows a training loop must feed.

Used by :class:`~gradsurgery.integrations.transformers.SurgeryTrainer` to check, before any
step, that the sources and the Trainer's own batches feed exactly the rows of the wrapper.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer

from gradsurgery.wrappers import (
    MultiObjectiveOptimizer,
    PhasedLR,
    SurgeryOptimizer,
    WrappedOptimizer,
)

__all__ = ["WrapperStack", "wraps"]


@dataclass(frozen=True)
class WrapperStack:
    """The gradsurgery wrappers of an optimizer, checked against what feeds their rows.

    Attributes:
        surgery: the gradient surgery (GEM, LF-MLF, a baseline), if any.
        phased: the :class:`~gradsurgery.PhasedLR`, if any.
        own: the objectives the Trainer's own batches feed (multi-objective surgery only):
            ``(train_objective,)``, or with ``compute_objectives`` every objective that
            no source feeds.
        fed: the rows that sources feed, in row order.
        surgery_outermost: whether the surgery is the outermost wrapper.
    """

    surgery: SurgeryOptimizer[Any] | None
    phased: PhasedLR | None
    own: tuple[str, ...]
    fed: tuple[str, ...]
    surgery_outermost: bool

    @classmethod
    def of(
        cls,
        optimizer: Optimizer,
        sources: Iterable[str],
        train_objective: str | None,
        split: bool = False,
    ) -> WrapperStack:
        """Find the wrappers in ``optimizer`` and check what feeds them.

        ``split`` says that ``compute_objectives`` splits the Trainer's batches into
        objectives.

        Raises:
            ValueError: no gradsurgery wrapper, a ``grad_scaler`` already set, or sources,
                ``train_objective`` and ``compute_objectives`` that do not match the
                wrapper's rows.
        """
        surgery: SurgeryOptimizer[Any] | None = None
        phased: PhasedLR | None = None
        outermost: Optimizer | None = None
        inner: object = optimizer
        while isinstance(inner, Optimizer):  # through accelerate's AcceleratedOptimizer too
            if isinstance(inner, WrappedOptimizer) and outermost is None:
                outermost = inner
            if isinstance(inner, SurgeryOptimizer):
                surgery = inner
            elif isinstance(inner, PhasedLR):
                phased = inner
            inner = getattr(inner, "optimizer", None)
        if surgery is None and phased is None:
            raise ValueError(
                f"the optimizer is a {type(optimizer).__name__}, not a gradsurgery wrapper; "
                "SurgeryTrainer runs GEMProjector, the multi-objective wrappers and PhasedLR"
            )
        names = set(sources)
        own: tuple[str, ...] = ()
        if not isinstance(surgery, MultiObjectiveOptimizer):
            if train_objective is not None or split:
                given = "train_objective" if train_objective is not None else "compute_objectives"
                raise ValueError(
                    f"{given} applies to multi-objective wrappers (LF-MLF, Uniform, PCGrad, "
                    "GradVac, MGDA); here the Trainer's loss is the gradient to step on"
                )
            expected = () if surgery is None else surgery.row_names
        elif split:
            if train_objective is not None:
                raise ValueError("give train_objective or compute_objectives, not both")
            unknown = names - set(surgery.objectives)
            if unknown or names == set(surgery.objectives):
                raise ValueError(
                    f"sources are given for {sorted(names)}; with compute_objectives they "
                    f"may feed some of the objectives {list(surgery.objectives)}, and the "
                    "Trainer's batches the others (at least one)"
                )
            own = tuple(name for name in surgery.objectives if name not in names)
            expected = tuple(name for name in surgery.objectives if name in names)
        else:
            if train_objective not in surgery.objectives:
                raise ValueError(
                    f"{type(surgery).__name__} needs train_objective, the objective of the "
                    f"Trainer's own batches (one of {list(surgery.objectives)}, got "
                    f"{train_objective!r}), or compute_objectives"
                )
            own = (train_objective,)
            expected = tuple(name for name in surgery.objectives if name != train_objective)
        if names != set(expected):
            kind = "no row" if surgery is None else f"the {surgery.row_kind}s {list(expected)}"
            raise ValueError(
                f"sources are given for {sorted(names)}, but the wrapper needs one for each of "
                f"{kind}, and no other"
            )
        if surgery is not None and surgery.grad_scaler is not None:
            raise ValueError(
                f"{type(surgery).__name__} has a grad_scaler; leave it unset: under fp16 the "
                "Trainer's own GradScaler is used"
            )
        return cls(surgery, phased, own, expected, surgery is outermost)


def wraps(wrapper: Optimizer, inner: Optimizer) -> bool:
    """Whether ``inner`` is in the stack of wrappers under ``wrapper``."""
    while isinstance(wrapper, WrappedOptimizer):
        wrapper = wrapper.optimizer
        if wrapper is inner:
            return True
    return False

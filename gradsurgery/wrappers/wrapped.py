"""``WrappedOptimizer``: a ``torch.optim.Optimizer`` that delegates to an inner one.

Every gradsurgery wrapper is one. What it shares with the optimizer it wraps:

* ``param_groups`` and ``state`` *are* the inner optimizer's (the same list and mapping),
  so LR schedulers, gradient clipping and ``GradScaler`` see exactly the groups and tensors
  they would see without the wrapper, and wrappers stack (``PhasedLR(GEMProjector(AdamW))``);
* ``add_param_group`` and ``zero_grad`` go to the inner optimizer;
* ``state_dict()`` is the inner optimizer's, with the wrapper's own state appended to a
  list under the key ``"gradsurgery"`` (one entry per wrapper of a stack, innermost first);
  ``load_state_dict`` takes its entry off the end and hands the rest inward;
* step hooks (``register_step_pre_hook``, the profiler's ``Optimizer.step`` record) work as
  on any ``torch.optim`` optimizer;
* ``copy.deepcopy``, ``pickle`` and ``torch.save`` copy the whole stack (hooks excepted, as
  for ``torch.optim`` optimizers).

Subclasses implement ``step`` and, where they keep state, ``_extra_state``,
``_check_extra_state`` and ``_load_extra_state``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

from torch.optim import Optimizer

from gradsurgery.papers import Paper

__all__ = ["STATE_KEY", "WrappedOptimizer", "check_optimizer"]

STATE_KEY = "gradsurgery"


class WrappedOptimizer(Optimizer):
    """Base class: an optimizer whose groups, state and hyper-parameters are an inner one's.

    Args:
        optimizer: the inner optimizer; it keeps its parameters, groups and state.

    Attributes:
        wrapped_by: the wrapper around this one in a stack, if any.
        papers: the papers of the method a subclass implements (cite them with
            :func:`gradsurgery.cite`).
        bibtex: their BibTeX entries, one after the other.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
    """

    papers: ClassVar[tuple[Paper, ...]] = ()
    rewrites_grad: ClassVar[bool] = False
    """Whether the wrapper owns and rewrites ``.grad`` (a gradient surgery; one per stack)."""
    bibtex: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.bibtex = "\n\n".join(paper.bibtex for paper in cls.papers)

    def __init__(self, optimizer: Optimizer) -> None:
        check_optimizer(optimizer)
        # Optimizer.__init__ would build groups of its own; set up what it sets up instead.
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.wrapped_by: WrappedOptimizer | None = None
        if isinstance(optimizer, WrappedOptimizer):
            optimizer.wrapped_by = self

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether ``GradScaler.step`` hands itself to :meth:`step` (see ``wrappers.amp``).

        True when a gradient surgery is inside: ``step`` passes the scaler on to it.
        """
        inner = self.optimizer
        return isinstance(inner, WrappedOptimizer) and inner._step_supports_amp_scaling

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the hooks (as ``torch.optim.Optimizer``): the inner optimizer too.

        ``copy.deepcopy``, ``pickle`` and ``torch.save`` then give a working wrapper around
        a copy of the inner optimizer (with the model's parameters when the model is
        copied in the same call).
        """
        return {
            key: value
            for key, value in self.__dict__.items()
            if not (key.startswith("_optimizer_") and key.endswith("_hooks"))
        }

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's parameter groups (the same list)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        """The inner optimizer's per-parameter state (the same mapping)."""
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self._settings().items())
        inner = repr(self.optimizer).replace("\n", "\n  ")
        return f"{type(self).__name__}({settings},\n  optimizer={inner})"

    def _settings(self) -> dict[str, Any]:
        """The constructor settings shown by ``repr`` (subclasses extend it)."""
        return {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients through the inner optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _extra_state(self) -> dict[str, Any]:
        """The wrapper's own state, saved by :meth:`state_dict` (subclasses extend it)."""
        return {}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` cannot be loaded into this wrapper."""

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the wrapper's own state (subclasses extend it)."""

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus this wrapper's state under ``"gradsurgery"``."""
        state = dict(self.optimizer.state_dict())
        entry = {"wrapper": type(self).__name__, **self._extra_state()}
        state[STATE_KEY] = [*state.get(STATE_KEY, []), entry]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict` of the same stack of wrappers.

        Everything is checked before anything is loaded; a refused state dict changes
        nothing.
        """
        stack = list(state_dict.get(STATE_KEY, []))
        if not stack:
            raise ValueError(
                f"this state dict has no {STATE_KEY!r} entry: it was saved from a plain "
                f"optimizer; load it into the inner optimizer instead "
                f"({type(self).__name__}.optimizer.load_state_dict)"
            )
        self._check_stack(stack)
        entry = stack.pop()
        inner = {key: value for key, value in state_dict.items() if key != STATE_KEY}
        if stack:
            inner[STATE_KEY] = stack
        self.optimizer.load_state_dict(inner)
        self._load_extra_state(entry)

    def _check_stack(self, stack: list[dict[str, Any]]) -> None:
        """Check this wrapper's entry (the last) and, through the inner wrappers, theirs."""
        entry = stack[-1]
        if entry.get("wrapper") != type(self).__name__:
            raise ValueError(
                f"this state dict was saved from a {entry.get('wrapper')}, not a "
                f"{type(self).__name__}"
            )
        self._check_extra_state(entry)
        if isinstance(self.optimizer, WrappedOptimizer):
            if len(stack) < 2:
                raise ValueError(
                    f"this state dict has no entry for the inner {type(self.optimizer).__name__}"
                )
            self.optimizer._check_stack(stack[:-1])


def check_optimizer(optimizer: object) -> None:
    """Raise ``TypeError`` unless ``optimizer`` is a ``torch.optim.Optimizer``."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )

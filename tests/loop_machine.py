"""The user's side of the training-loop state machines (see tests/test_training_loop.py).

:class:`TrainingLoop` holds a wrapped model, its plain-torch twin
(:class:`tests.loop_reference.Reference`) and the rules every loop shares: backward passes,
``zero_grad`` through each owner, the step (with ``apply_surgery``, clipping and a replaced
``p.grad``), and changes to the model (freezing, ``channels_last``, ``.double()``,
``add_param_group``, save and load). Subclasses build the wrapper and plan its step.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import event, note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)
from torch import Tensor

from gradsurgery.errors import NonFiniteGradientError, ParetoStationaryError, SolverError
from gradsurgery.wrappers.surgery import SurgeryOptimizer
from tests.loop_reference import (
    GROWTH_INTERVAL,
    Net,
    Plan,
    Reference,
    ScalerReference,
    documented,
    extra_group,
    group_params,
    loss,
    make_inner,
)

seeds = st.integers(0, 2**16)
layer_sets = st.frozensets(st.sampled_from(("lin", "conv", "extra")), max_size=3)
rare = st.integers(0, 5).map(lambda i: i == 5)
clips = st.none() | st.sampled_from([0.05, 0.5, 5.0])
reassigns = st.none() | st.integers(0, 20)
FREEZABLE = ("conv", "unused", "extra")
REFUSAL_WINDOW = 2  # steps during which a change may still be refused when it is noticed
# A change to the model may be refused with a documented RuntimeError or ValueError, never
# with these: they would say the gradients or the solve are at fault.
LIBRARY_ERRORS = (NonFiniteGradientError, ParetoStationaryError, SolverError)


def _grad(p: Tensor) -> Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad.detach()


class TrainingLoop(RuleBasedStateMachine):
    """What every loop does; subclasses build the wrapper and plan its step."""

    row_kind = "row"

    # -- set-up --------------------------------------------------------------------------

    def _setup(self, seed: int, dtype: torch.dtype, inner: str, scaler: str, rows: int) -> None:
        self.seed = seed
        self.inner_kind = inner
        self.scaler_mode = scaler  # "none", "passed" (grad_scaler=) or "unpassed"
        self.n_rows = rows
        self.dtype = dtype
        self.ever_float32 = dtype == torch.float32
        self.frozen: set[str] = set()
        self.channels_last = False
        self.extra_added = False
        self.model = Net(seed, dtype)
        self.ref = Reference(Net(seed, dtype), inner, rows, extra=False)
        self.inner = make_inner(inner, self.model, extra=False)
        self.scaler_ref = ScalerReference() if scaler != "none" else None
        self.scaler = self._new_scaler(self.scaler_ref)
        self.opt = self._wrap(self.inner)
        self.need_zero = False  # a step ran: the next backward needs a zero_grad first
        self.touched = False  # a backward ran since the last step or zero_grad
        self.rows_touched = False  # a routed backward ran since then
        self.stray = False
        self.refusable: dict[str, int] = {}
        note(f"setup seed={seed} dtype={dtype} inner={inner} scaler={scaler} rows={rows}")

    def _new_scaler(self, state: ScalerReference | None) -> torch.amp.GradScaler | None:
        if state is None:
            return None
        scaler = torch.amp.GradScaler(
            "cpu", init_scale=state.scale, growth_interval=GROWTH_INTERVAL
        )
        scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": state.clean_steps})
        return scaler

    def _wrap(self, inner: torch.optim.Optimizer) -> SurgeryOptimizer[Any]:
        raise NotImplementedError

    def _plan(self) -> Plan:
        raise NotImplementedError

    @property
    def _passed_scaler(self) -> torch.amp.GradScaler | None:
        return self.scaler if self.scaler_mode == "passed" else None

    def _close(self, actual: Tensor, expected: Tensor, label: str) -> None:
        """Equal up to float64 rounding, or float32's once the model has been float32."""
        rtol, atol = (2e-4, 1e-5) if self.ever_float32 else (1e-9, 1e-12)
        torch.testing.assert_close(
            actual, expected, rtol=rtol, atol=atol, msg=lambda message: f"{label}: {message}"
        )

    def _named(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())

    def _allowed(self, parts: frozenset[str]) -> frozenset[str]:
        """The layers a loss may reach: trainable ones; ``extra`` outside the optimizer only
        without a scaler (its ``.grad`` would stay scaled, as with any plain optimizer)."""
        allowed = {part for part in parts if part not in self.frozen}
        if not self.extra_added and self.scaler is not None:
            allowed.discard("extra")
        return frozenset(allowed) or frozenset({"lin"})

    def _scaled(self, value: Tensor) -> Tensor:
        return value if self.scaler is None else self.scaler.scale(value)

    # -- checks --------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().clone() for n, p in self._named().items()},
            "grads": {n: _grad(p).clone() for n, p in self._named().items()},
            "state": copy.deepcopy(self.inner.state_dict()),
        }

    def _check_unchanged(self, before: dict[str, Any]) -> None:
        after = self._snapshot()
        for name in before["params"]:
            assert torch.equal(before["params"][name], after["params"][name]), name
            if self.scaler is None:  # else scaler.unscale_ may have run before the refusal
                assert torch.equal(before["grads"][name], after["grads"][name]), f"{name}.grad"
        assert _same_state(before["state"], after["state"]), "optimizer state changed"

    def _attempt(
        self,
        action: Callable[[], None],
        expected: tuple[type[BaseException], ...] | None,
        misuse: bool = False,
    ) -> bool:
        """Run ``action`` on the library; False if it raised a documented refusal (expected,
        or of a ``misuse`` or a recent change of the model)."""
        before = self._snapshot()
        try:
            action()
        except Exception as error:
            if not documented(error):
                raise
            tolerated = misuse or (self.refusable and not isinstance(error, LIBRARY_ERRORS))
            if expected is None and not tolerated:
                raise AssertionError(f"refused a sound training loop: {error!r}") from error
            if expected is not None and not isinstance(error, expected):
                raise AssertionError(f"expected one of {expected}, got {error!r}") from error
            note(f"refused: {error!r}")
            self._check_unchanged(before)
            if expected is None:
                event(f"documented refusal after {sorted(self.refusable)}")
                self._rebuild_from_reference()
            return False
        assert expected is None, f"expected one of {expected}, the step went through"
        return True

    def _check_outside_grads(self) -> None:
        """Parameters outside the optimizer keep torch's own ``.grad``."""
        if self.scaler is not None or self.extra_added:
            return
        for name, p in self.model.extra.named_parameters():
            ref = getattr(self.ref.model.extra, name)
            self._close(_grad(p), _grad(ref), f"extra.{name}")

    def _check_grads(self, plan: Plan) -> None:
        named = self._named()
        for name, grad in plan.grads.items():
            expected = torch.zeros_like(named[name]) if grad is None else grad
            self._close(_grad(named[name]), expected, f"{name}.grad after surgery")

    def _check_state(self) -> None:
        lib = self.inner.state
        for p, q in zip(group_params(self.inner), group_params(self.ref.optimizer), strict=True):
            mine, theirs = lib.get(p, {}), self.ref.optimizer.state.get(q, {})
            assert set(mine) == set(theirs), f"optimizer state keys {set(mine)} != {set(theirs)}"
            for key, value in theirs.items():
                self._close(mine[key], value, key)
        if self.scaler is not None:
            assert self.scaler_ref is not None
            assert self.scaler.get_scale() == self.scaler_ref.scale

    @invariant()
    def parameters_match(self) -> None:
        if not hasattr(self, "model"):
            return
        ref = dict(self.ref.model.named_parameters())
        for name, p in self._named().items():
            assert p.dtype == ref[name].dtype, name
            self._close(p.detach(), ref[name].detach(), name)

    # -- gradients -----------------------------------------------------------------------

    def _row_backward(
        self, k: int, seed: int, parts: frozenset[str], micro: bool, inf: bool
    ) -> None:
        parts = self._allowed(parts)
        k %= self.n_rows
        shift = 0.5 * (k + 1)
        note(f"{self.row_kind} {k}: parts={sorted(parts)} micro={micro} inf={inf}")

        def lib() -> None:
            with getattr(self.opt, self.row_kind)(k):
                for batch in range(1 + micro):
                    self._scaled(loss(self.model, seed + batch, parts, shift, inf)).backward()

        if self._attempt(lib, None):
            for batch in range(1 + micro):
                self.ref.row_backward(k, loss(self.ref.model, seed + batch, parts, shift, inf))
            self.touched = self.rows_touched = True
            self._check_outside_grads()
        else:
            self._abandon()

    def _plain_backward(self, seed: int, parts: frozenset[str], micro: bool, inf: bool) -> None:
        parts = self._allowed(parts)
        for batch in range(1 + micro):
            self._scaled(loss(self.model, seed + batch, parts, 0.0, inf)).backward()
            loss(self.ref.model, seed + batch, parts, 0.0, inf).backward()
        self.touched = True
        self._check_outside_grads()

    @rule(set_to_none=st.booleans())
    def zero_grad_wrapper(self, set_to_none: bool) -> None:
        """``opt.zero_grad`` clears ``.grad`` (torch's way) and every row."""
        if self._attempt(lambda: self.opt.zero_grad(set_to_none=set_to_none), None):
            self.ref.optimizer.zero_grad(set_to_none=set_to_none)
            self.ref.clear_rows()
            self._zeroed()

    @precondition(lambda self: not self.rows_touched)
    @rule(through_model=st.booleans(), set_to_none=st.booleans())
    def zero_grad_outside(self, through_model: bool, set_to_none: bool) -> None:
        """``model.zero_grad`` or ``opt.optimizer.zero_grad``; no routed gradient is pending
        (which rows these should clear mid-step is not defined)."""
        lib = self.model if through_model else self.inner
        ref = self.ref.model if through_model else self.ref.optimizer
        lib.zero_grad(set_to_none=set_to_none)
        ref.zero_grad(set_to_none=set_to_none)
        self.ref.clear_rows()
        self._zeroed()

    def _backward_every_row(self, seed: int, parts: frozenset[str], inf: bool) -> None:
        """This iteration's backward passes, one into every row (subclasses)."""
        raise NotImplementedError

    @precondition(lambda self: not self.rows_touched)
    @rule(
        through=st.sampled_from(["wrapper", "model", "inner"]),
        set_to_none=st.booleans(),
        seed=seeds,
        parts=layer_sets,
        inf=rare,
        clip=clips,
        reassign=reassigns,
    )
    def iteration(
        self,
        through: str,
        set_to_none: bool,
        seed: int,
        parts: frozenset[str],
        inf: bool,
        clip: float | None,
        reassign: int | None,
    ) -> None:
        """A whole iteration: ``zero_grad`` through the wrapper, the model or the inner
        optimizer, every backward pass, ``step`` (the other rules take them one by one)."""
        if through == "wrapper":
            self.zero_grad_wrapper(set_to_none)
        else:
            self.zero_grad_outside(through == "model", set_to_none)
        if self.need_zero:
            return
        self._backward_every_row(seed, parts, inf)
        if not self.need_zero and all(self.ref.filled):
            self.step(clip, reassign)

    def _zeroed(self) -> None:
        self.need_zero = self.touched = self.rows_touched = self.stray = False

    def _abandon(self) -> None:
        """After a refused step the iteration is dropped: the next one starts with zero_grad."""
        self.ref.clear_rows()
        self.need_zero = True
        self.touched = self.rows_touched = self.stray = False

    # -- the step ------------------------------------------------------------------------

    @precondition(
        lambda self: (
            not self.need_zero
            and (self.scaler is None or (all(self.ref.filled) and not self.stray))
        )
    )
    @rule(clip=clips, reassign=reassigns)
    def step(self, clip: float | None, reassign: int | None) -> None:
        """``step()``; with ``clip`` or ``reassign``, ``apply_surgery()`` first, then
        ``clip_grad_norm_`` or ``p.grad = p.grad * 0.5`` on one parameter. A step that must
        be refused (a missing row, a stray backward) is not taken under a scaler: a failed
        ``scaler.step`` leaves the scaler mid-step, with or without a wrapper."""
        missing = not all(self.ref.filled)
        plan = self._plan()
        explicit = clip is not None or reassign is not None
        candidates = [name for name, grad in plan.grads.items() if grad is not None]
        target = (
            candidates[reassign % len(candidates)] if reassign is not None and candidates else None
        )
        note(f"step clip={clip} reassign={target} plan: error={plan.error} skip={plan.skip}")

        def user(params: list[Tensor], named: dict[str, Tensor]) -> None:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            if target is not None:
                p = named[target]
                assert p.grad is not None, f"{target}.grad is None after the surgery"
                p.grad = p.grad * 0.5

        # apply_surgery() before scaler.step() cannot know a scaler it was not given: it may
        # rewrite .grad from scaled rows, as long as the step is then refused
        misuse = explicit and self.scaler_mode == "unpassed"

        def lib() -> None:
            if explicit:
                if self.scaler is not None:
                    self.scaler.unscale_(self.opt)
                self.opt.apply_surgery()
                if not plan.skip and not misuse:
                    self._check_grads(plan)
                user(group_params(self.inner), self._named())
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()

        if not self._attempt(lib, plan.error, misuse):
            if plan.error is None or not missing:
                self._abandon()
            else:  # a refused step ends it: its rows are discarded, .grad is kept
                self.ref.clear_rows()
                self.rows_touched = False
            return
        if plan.error is not None:
            return
        if not plan.skip:
            self.ref.apply(plan)
            user(group_params(self.ref.optimizer), dict(self.ref.model.named_parameters()))
            self.ref.step()
        if self.scaler_ref is not None:
            self.scaler_ref.update(plan.found_inf)
        self.ref.clear_rows()
        self.need_zero = True
        self.touched = self.rows_touched = self.stray = False
        if target is not None:
            self.refusable["p.grad replaced"] = REFUSAL_WINDOW + 1
        self.refusable = {k: v - 1 for k, v in self.refusable.items() if v > 1}
        self._check_state()

    # -- changes to the model ------------------------------------------------------------

    def _changed(self, what: str) -> None:
        note(what)
        self.refusable[what] = REFUSAL_WINDOW

    @precondition(lambda self: not self.touched and len(self.frozen) < len(FREEZABLE))
    @rule(index=st.integers(0, len(FREEZABLE) - 1))
    def freeze(self, index: int) -> None:
        """``requires_grad_(False)`` on a trainable layer after wrapping (``lin`` never)."""
        trainable = [layer for layer in FREEZABLE if layer not in self.frozen]
        layer = trainable[index % len(trainable)]
        getattr(self.model, layer).requires_grad_(False)
        getattr(self.ref.model, layer).requires_grad_(False)
        self.frozen.add(layer)
        self._changed(f"freeze {layer}")

    @precondition(lambda self: not self.touched and bool(self.frozen))
    @rule(index=st.integers(0, len(FREEZABLE) - 1))
    def unfreeze(self, index: int) -> None:
        """``requires_grad_(True)`` on a frozen layer."""
        layer = sorted(self.frozen)[index % len(self.frozen)]
        getattr(self.model, layer).requires_grad_(True)
        getattr(self.ref.model, layer).requires_grad_(True)
        self.frozen.discard(layer)
        self._changed(f"unfreeze {layer}")

    @precondition(lambda self: not self.touched and not self.channels_last)
    @rule()
    def to_channels_last(self) -> None:
        """``model.to(memory_format=torch.channels_last)`` after wrapping."""
        _channels_last(self.model)
        _channels_last(self.ref.model)
        self.channels_last = True
        self._changed("channels_last")

    @precondition(
        lambda self: (
            not self.touched and self.dtype == torch.float32 and not self.ref.optimizer.state
        )
    )
    @rule()
    def to_double(self) -> None:
        """``model.double()`` after wrapping, before any step (a plain AdamW cannot step
        float64 parameters with float32 state either)."""
        self.model.double()
        self.ref.model.double()
        self.dtype = torch.float64
        self._changed("double")

    @precondition(lambda self: not self.touched and not self.extra_added)
    @rule()
    def add_param_group(self) -> None:
        """``opt.add_param_group`` with the ``extra`` layer and its own learning rate."""
        self._changed("add_param_group")
        if self._attempt(lambda: self.opt.add_param_group(extra_group(self.model)), None):
            self.ref.optimizer.add_param_group(extra_group(self.ref.model))
            self.extra_added = True

    @precondition(lambda self: not self.touched)
    @rule(fresh_seed=seeds)
    def save_and_load(self, fresh_seed: int) -> None:
        """Save model, optimizer (and scaler) state dicts; load them into fresh objects."""

        def lib() -> None:
            saved = _round_trip(
                {
                    "model": self.model.state_dict(),
                    "opt": self.opt.state_dict(),
                    "scaler": None if self.scaler is None else self.scaler.state_dict(),
                }
            )
            self.scaler = self._new_scaler(self.scaler_ref)
            if self.scaler is not None:
                self.scaler.load_state_dict(saved["scaler"])
            model, inner = self._fresh(fresh_seed, saved["model"])
            opt = self._wrap(inner)
            opt.load_state_dict(saved["opt"])
            self.model, self.inner, self.opt = model, inner, opt

        if not self._attempt(lib, None):
            return
        saved = _round_trip(
            {"model": self.ref.model.state_dict(), "opt": self.ref.optimizer.state_dict()}
        )
        self.ref.model, self.ref.optimizer = self._fresh(fresh_seed, saved["model"])
        self.ref.optimizer.load_state_dict(saved["opt"])
        self.ref.clear_rows()
        self._zeroed()
        note("saved and loaded into fresh objects")

    def _fresh(self, seed: int, state: dict[str, Tensor]) -> tuple[Net, torch.optim.Optimizer]:
        """A new model built like the current one, with ``state`` loaded, and its optimizer."""
        model = Net(seed, self.dtype)
        if self.channels_last:
            _channels_last(model)
        for layer in self.frozen:
            getattr(model, layer).requires_grad_(False)
        model.load_state_dict(state)
        return model, make_inner(self.inner_kind, model, self.extra_added)

    def _rebuild_from_reference(self) -> None:
        """After a refusal: fresh model, optimizer and wrapper from the twin's state."""
        saved = _round_trip(
            {"model": self.ref.model.state_dict(), "opt": self.ref.optimizer.state_dict()}
        )
        self.model, self.inner = self._fresh(self.seed + 1, saved["model"])
        self.inner.load_state_dict(saved["opt"])
        self.scaler = self._new_scaler(self.scaler_ref)
        self.opt = self._wrap(self.inner)
        self.ref.model.zero_grad(set_to_none=True)
        self.ref.accumulated = {}
        self.refusable = {}
        self._abandon()
        self.need_zero = False


def _channels_last(model: Net) -> None:
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=False)
    return loaded


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)

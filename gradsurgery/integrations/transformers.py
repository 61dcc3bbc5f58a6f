"""``SurgeryTrainer``: any gradsurgery wrapper inside ``transformers.Trainer.train()``.

The Trainer keeps doing what it does (data, the task loss, gradient accumulation, mixed
precision, clipping, the LR scheduler, checkpoints, logging); the subclass adds, in
:meth:`SurgeryTrainer.training_step`, what a wrapper needs each step:

* after the task backward of every micro-batch, one batch of every
  :class:`~gradsurgery.integrations.sources.LossSource` (a GEM constraint's memory data, an
  objective's batches), its loss scaled like the task loss, backward into its row;
* after the last micro-batch of a step, the step's training loss to ``PhasedLR.observe``
  and the surgery (``apply_surgery()``), so that the Trainer's gradient clipping, which
  follows, acts on the rewritten gradient;
* under DDP, ``distributed=Replicated()`` for the surgery and ``no_sync()`` around every
  routed pass (:mod:`gradsurgery.integrations.processes`).

Needs ``transformers`` (and ``accelerate``, which its Trainer needs): ``pip install
gradsurgery[transformers]``. Tested with transformers 5.23 and accelerate 1.15; see
``docs/trainer.md`` for the Trainer internals this relies on.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import Trainer

from gradsurgery.distributed import Distributed
from gradsurgery.integrations import processes
from gradsurgery.integrations.sources import (
    BatchStream,
    LossFn,
    LossSource,
    check_sources,
    drawer,
)
from gradsurgery.integrations.stack import WrapperStack, wraps
from gradsurgery.wrappers import PhasedStats, StepStats, WrappedOptimizer

__all__ = ["SOURCES_NAME", "ObjectivesFn", "SurgeryTrainer"]

SOURCES_NAME = "gradsurgery_sources.pt"
"""The file of a checkpoint that holds the states of the sources' iterators."""

ObjectivesFn = Callable[[nn.Module, Any], Mapping[str, Tensor]]
"""``compute_objectives(model, inputs) -> {objective: loss}``: a Trainer batch split into
the losses of several objectives (e.g. one per language of a batch keyed by language)."""


class SurgeryTrainer(Trainer):
    r"""A ``transformers.Trainer`` whose optimizer steps through a gradsurgery wrapper.

    .. code-block:: python

        trainer = SurgeryTrainer(
            model=model, args=args, train_dataset=task_data,      # as for Trainer
            wrap=lambda inner: GEMProjector(inner, constraints=["mlm"]),
            sources={"mlm": (memory_loader, mlm_loss)},           # loss(model, batch)
        )
        trainer.train()

    **The optimizer.** Either ``wrap`` turns the optimizer the Trainer creates (AdamW by
    default, from ``TrainingArguments``) into a wrapper, or ``optimizers=(wrapper,
    scheduler)`` gives one built by hand. The Trainer's LR scheduler is created after the
    wrapper, on its parameter groups (which are the inner optimizer's).

    **Sources.** ``sources`` maps each row the wrapper needs to a
    :class:`~gradsurgery.integrations.sources.LossSource` or a pair ``(batches, loss)``:
    every GEM constraint; for a multi-objective wrapper (LF-MLF, the baselines) every
    objective that the Trainer's own batches (``train_dataset``) do not feed; none for
    ``PhasedLR`` alone. The Trainer's batches feed ``train_objective``, or with
    ``compute_objectives(model, inputs) -> {objective: loss}`` several objectives at once
    (e.g. a batch keyed by language). Every micro-batch, each source gives its next batch
    (moved to the Trainer's device), ``loss(model, batch)`` is divided by the number of
    micro-batches in the step, as the Trainer divides the task loss, and its backward pass
    goes to the source's row. An iterable is cycled by position: micro-batch ``i`` of
    optimizer step ``s`` uses batch ``s · gradient_accumulation_steps + i``; an iterator
    is drawn with ``next()`` and, if it has ``state_dict``, saved with checkpoints. A
    resumed run then draws the batches the uninterrupted run drew (an iterator without
    ``state_dict`` starts where it is).

    **Each step**, after its last micro-batch, ``PhasedLR`` observes the step's training
    loss (the Trainer's loss, summed over the micro-batches) and the surgery rewrites
    ``.grad``; then the Trainer clips (``max_grad_norm``) the rewritten gradient and steps.
    Under fp16 the surgery (which must then be the outermost wrapper) unscales every row
    with the Trainer's ``GradScaler``, and a step in which any row overflowed is skipped.

    **Logs.** Whenever the Trainer logs its training loss, the statistics of that step
    (``last_stats.to_dict()`` of each wrapper: ``gem/...``, ``lfmlf/...``, ``phased/...``)
    are logged with it, like ``grad_norm``; ``logging_steps=1`` logs every step's.

    **Checkpoints** hold the wrapper's state in ``optimizer.pt`` (its ``state_dict``) and
    the iterator sources' states in :data:`SOURCES_NAME` (one file per rank under DDP), so
    ``train(resume_from_checkpoint=...)`` restores them.

    **Several processes** (``torchrun``, ``accelerate launch``: DDP). The surgery gets
    ``distributed=Replicated()`` from the Trainer's set-up; every routed pass runs under
    ``no_sync()`` and the surgery averages its rows (``docs/distributed.md``); each rank draws
    from its own sources, so the step is the one-process step on the union of the ranks'
    batches (``docs/trainer.md``).

    Args:
        *args: ``Trainer``'s arguments.
        wrap: ``wrap(inner) -> optimizer``, a gradsurgery wrapper around ``inner`` (for
            stacks, the outermost); leave out when ``optimizers`` gives the wrapper.
        sources: ``{name: (batches, loss)}`` for the rows the wrapper needs (see above).
        train_objective: for a multi-objective wrapper, the objective of the Trainer's
            own batches.
        compute_objectives: for a multi-objective wrapper, instead of ``train_objective``:
            ``compute_objectives(model, inputs) -> {objective: loss}`` for the objectives
            no source feeds; each loss is backwarded into its objective's row.
        **kwargs: ``Trainer``'s keyword arguments.

    Raises:
        ValueError: neither or both of ``wrap`` and an optimizer in ``optimizers``, bad
            sources, or (for an optimizer given) sources, ``train_objective`` and
            ``compute_objectives`` that do not match its rows; nothing is changed. A
            ``wrap`` result is checked the same way when ``train()`` creates the optimizer.
    """

    def __init__(
        self,
        *args: Any,
        wrap: Callable[[Optimizer], Optimizer] | None = None,
        sources: Mapping[str, LossSource | tuple[Iterable[Any], LossFn]] | None = None,
        train_objective: str | None = None,
        compute_objectives: ObjectivesFn | None = None,
        **kwargs: Any,
    ) -> None:
        checked = check_sources({} if sources is None else sources)
        bound = inspect.signature(Trainer.__init__).bind_partial(None, *args, **kwargs)
        given = bound.arguments.get("optimizers", (None, None))[0]
        if wrap is not None and not callable(wrap):
            raise ValueError(f"wrap must be callable as wrap(inner), got {type(wrap).__name__}")
        if (wrap is None) == (given is None):
            raise ValueError(
                "give either wrap= (a function that wraps the optimizer the Trainer creates) "
                "or optimizers=(wrapper, scheduler), not "
                + ("both" if wrap is not None else "neither")
            )
        if compute_objectives is not None and not callable(compute_objectives):
            raise ValueError(
                "compute_objectives must be callable as compute_objectives(model, inputs), "
                f"got {type(compute_objectives).__name__}"
            )
        split = compute_objectives is not None
        stack = None if given is None else WrapperStack.of(given, checked, train_objective, split)
        super().__init__(*args, **kwargs)
        self.wrap = wrap
        self.sources = checked
        self.train_objective = train_objective
        self.compute_objectives = compute_objectives
        self.wrappers: WrapperStack | None = stack
        self._draws = {name: drawer(name, source.batches) for name, source in checked.items()}
        self._window_step: int | None = None
        self._micro_batch = 0
        self._window_loss: Tensor | None = None
        self._surgery_stats: StepStats | None = None
        self._layout: Distributed | None = None

    # -- the optimizer ---------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """Create the Trainer's optimizer and wrap it with ``wrap`` (once), then check it.

        Raises:
            ValueError: ``wrap`` returned something that is not a gradsurgery wrapper around
                the optimizer it was given, or one whose rows the sources do not match, a
                surgery that is not outermost under fp16 or built for another
                ``distributed=`` layout, DeepSpeed or FSDP; the Trainer is left without an
                optimizer.
        """
        chosen = processes.layout(
            self.accelerator, deepspeed=self.is_deepspeed_enabled, fsdp=self.is_fsdp_enabled
        )
        fresh = self.optimizer is None
        optimizer: Optimizer = super().create_optimizer(model)
        if fresh and self.wrap is not None:
            self.optimizer = None
            wrapped = self.wrap(optimizer)
            if not isinstance(wrapped, WrappedOptimizer) or not wraps(wrapped, optimizer):
                raise ValueError(
                    f"wrap must return a gradsurgery wrapper around the optimizer it is given, "
                    f"got {type(wrapped).__name__}"
                )
            optimizer = wrapped
        self.wrappers = None
        stack = self._check(optimizer)
        scaler = self.accelerator.scaler
        if stack.surgery is not None and scaler is not None:
            if not hasattr(Trainer, "_clip_grad_norm"):
                raise ValueError(
                    "a gradient surgery under fp16 needs transformers >= 5 (its Trainer's "
                    "_clip_grad_norm hook, where the surgery's unscaled gradients are clipped)"
                )
            if not stack.surgery_outermost:
                name = type(stack.surgery).__name__
                raise ValueError(
                    f"under fp16 {name} must be the outermost wrapper (e.g. "
                    f"{name}(PhasedLR(AdamW)), not the reverse): the Trainer's GradScaler "
                    "steps the outermost optimizer and would unscale the gradients the "
                    "surgery has already unscaled"
                )
        if chosen is not None and stack.surgery is not None:
            processes.adopt(stack.surgery, chosen)  # checks before it changes anything
        if stack.surgery is not None and scaler is not None:
            stack.surgery.grad_scaler = scaler
        self.optimizer, self.wrappers = optimizer, stack
        self._layout = chosen
        self._window_step = None
        return optimizer

    def _check(self, optimizer: Optimizer) -> WrapperStack:
        split = self.compute_objectives is not None
        return WrapperStack.of(optimizer, self.sources, self.train_objective, split)

    # -- the step --------------------------------------------------------------------------

    def _route(self, name: str | None) -> AbstractContextManager[None]:
        """Send backward passes to row ``name`` of the surgery (``None``: to ``.grad``)."""
        surgery = self._stack().surgery
        if name is None or surgery is None:
            return nullcontext()
        route: Callable[[str], AbstractContextManager[None]] = getattr(surgery, surgery.row_kind)
        return route(name)

    def _local(self, model: nn.Module, name: str | None) -> AbstractContextManager[Any]:
        """Keep DDP out of a routed backward pass: the wrapper averages its row itself."""
        return nullcontext() if name is None else processes.local_backward(model)

    def _stack(self) -> WrapperStack:
        if self.wrappers is None:
            raise RuntimeError("the optimizer has not been created yet; call train()")
        return self.wrappers

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """The Trainer's step on ``inputs``, then one batch of every source.

        After the last micro-batch of an optimizer step, ``PhasedLR`` observes the step's
        loss and the surgery rewrites ``.grad`` (before the Trainer clips it).
        Returns the Trainer's (task) loss, as ``Trainer.training_step`` does.
        """
        stack = self._stack()
        step = self.state.global_step
        if self._window_step != step:
            self._window_step, self._micro_batch, self._window_loss = step, 0, None
            if stack.surgery is not None:
                stack.surgery.zero_grad()
                stack.surgery.bank.repair()  # .grad ← the zeroed views, after model.zero_grad()
        loss: Tensor
        if self.compute_objectives is not None:
            loss = self._objectives_step(self.compute_objectives, model, inputs, stack.own)
        else:
            own = stack.own[0] if stack.own else None
            with self._route(own), self._local(model, own):
                loss = super().training_step(model, inputs, num_items_in_batch)
        position = step * self.args.gradient_accumulation_steps + self._micro_batch
        for name in stack.fed:
            batch = send_to_device(self._draws[name].at(position), self.args.device)
            with self._local(model, name):  # forward and backward: DDP must not prepare
                with self.compute_loss_context_manager():
                    extra = _checked_loss(self.sources[name].loss(model, batch), f"source {name!r}")
                with self._route(name):
                    self.accelerator.backward(extra / self.current_gradient_accumulation_steps)
        self._micro_batch += 1
        self._window_loss = loss if self._window_loss is None else self._window_loss + loss
        if self.accelerator.sync_gradients:
            if stack.phased is not None:
                stack.phased.observe(processes.mean_over_ranks(self._window_loss, self._layout))
            if stack.surgery is not None:
                self._surgery_stats = stack.surgery.apply_surgery()
        return loss

    def _objectives_step(
        self,
        compute_objectives: ObjectivesFn,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        own: tuple[str, ...],
    ) -> Tensor:
        """Split the Trainer's batch into objectives; backward each into its row.

        Returns the mean of the objectives' losses, divided like the Trainer's loss by the
        number of micro-batches in the step.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager(), processes.local_backward(model):
            losses = compute_objectives(model, inputs)
        if not isinstance(losses, Mapping) or set(losses) != set(own):
            got = sorted(losses) if isinstance(losses, Mapping) else type(losses).__name__
            raise ValueError(
                f"compute_objectives must return {{name: loss}} for the objectives {list(own)} "
                f"(those no source feeds), got {got}"
            )
        scale = self.current_gradient_accumulation_steps
        for index, name in enumerate(own):
            checked = _checked_loss(losses[name], f"objective {name!r} of compute_objectives")
            with self._route(name):
                self.accelerator.backward(checked / scale, retain_graph=index < len(own) - 1)
        return torch.stack([losses[name].detach() for name in own]).mean() / scale

    # -- checkpoints -----------------------------------------------------------------------

    def _streams(self) -> dict[str, BatchStream]:
        return {
            name: draw
            for name, draw in self._draws.items()
            if isinstance(draw, BatchStream) and draw.resumable
        }

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        streams = self._streams()
        if streams:  # every rank draws its own batches: one file per rank
            states = {name: stream.state_dict() for name, stream in streams.items()}
            os.makedirs(output_dir, exist_ok=True)
            name = processes.rank_file(SOURCES_NAME, self.accelerator)
            torch.save(states, os.path.join(output_dir, name))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        streams = self._streams()
        if checkpoint is None or not streams:
            return
        name = processes.rank_file(SOURCES_NAME, self.accelerator)
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            raise ValueError(
                f"{checkpoint} has no {name}: it was not saved by a SurgeryTrainer with the "
                f"sources {sorted(streams)} and as many processes"
            )
        states = torch.load(path, weights_only=True)
        if set(states) != set(streams):
            raise ValueError(
                f"{path} holds the states of the sources {sorted(states)}, not of {sorted(streams)}"
            )
        for name, stream in streams.items():
            stream.load_state_dict(states[name])

    # -- clipping under fp16 ---------------------------------------------------------------

    def _unscaled_by_surgery(self) -> bool:
        """Whether the surgery already unscaled this step's gradients (fp16)."""
        surgery = None if self.wrappers is None else self.wrappers.surgery
        scaler = None if surgery is None else surgery.grad_scaler
        return scaler is not None and scaler.is_enabled()

    def _clip_grad_norm(self, model: nn.Module) -> Tensor:
        # accelerate's clip_grad_norm_ unscales first, a second time under fp16 (GradScaler
        # refuses that): clip the gradients the surgery unscaled directly instead.
        if self._unscaled_by_surgery():
            return torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        norm: Tensor = super()._clip_grad_norm(model)  # type: ignore[no-untyped-call]
        return norm

    def _get_grad_norm(self, model: nn.Module, grad_norm: Tensor | None = None) -> Any:
        if grad_norm is None and self._unscaled_by_surgery():  # the norm, nothing clipped
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        return super()._get_grad_norm(model, grad_norm)  # type: ignore[no-untyped-call]

    # -- logging ---------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Log as the Trainer does; a training-loss entry also gets the step's statistics."""
        if "loss" in logs and self.wrappers is not None:
            stats: list[StepStats | PhasedStats | None] = [self._surgery_stats]
            if self.wrappers.phased is not None:
                stats.append(self.wrappers.phased.last_stats)
            logs = {**logs}
            for entry in stats:
                if entry is not None:
                    logs.update(entry.to_dict())
        super().log(logs, start_time)


def _checked_loss(loss: Any, what: str) -> Tensor:
    """``loss`` if it is a 0-d tensor, else ``ValueError`` naming ``what`` returned it."""
    if not (isinstance(loss, Tensor) and loss.dim() == 0):
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the loss of {what} must be a 0-d tensor, got {shape}")
    return loss

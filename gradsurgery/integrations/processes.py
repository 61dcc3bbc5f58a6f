"""Several processes under ``transformers.Trainer``: the layout of the gradients, and DDP.

:class:`~gradsurgery.integrations.transformers.SurgeryTrainer` reads the Trainer's own
set-up (accelerate's ``distributed_type``) to choose the wrapper's ``distributed=`` layout,
so that a script launched with ``torchrun`` or ``accelerate launch`` needs no change:

* one process: ``None``;
* DDP (``MULTI_CPU``, ``MULTI_GPU`` and the other ``MULTI_*`` types):
  :class:`~gradsurgery.distributed.Replicated`; every routed backward pass runs under
  ``no_sync()``, so DDP averages only ``.grad`` and the wrapper averages the rows when
  the surgery starts (reduce-scatter from two rows on, else one all-reduce: the default of
  ``Replicated()``, see ``docs/distributed.md``);
* DeepSpeed, FSDP, and the other engines: refused (see :func:`layout`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from gradsurgery import distributed as _distributed
from gradsurgery.distributed import Distributed, Replicated
from gradsurgery.wrappers import SurgeryOptimizer

__all__ = ["adopt", "layout", "local_backward", "mean_over_ranks", "rank_file"]


def layout(accelerator: Accelerator, *, deepspeed: bool, fsdp: bool) -> Distributed | None:
    """The ``distributed=`` layout of the Trainer's set-up: ``None`` or ``Replicated()``.

    ``deepspeed`` and ``fsdp`` are the Trainer's own flags (``is_deepspeed_enabled``,
    ``is_fsdp_enabled``).

    Raises:
        ValueError: DeepSpeed, FSDP, or another engine than DDP across several processes.
    """
    kind = accelerator.distributed_type
    if deepspeed or kind == DistributedType.DEEPSPEED:
        raise ValueError(
            "SurgeryTrainer does not run under DeepSpeed: its engine owns the gradients and "
            "steps them itself; use DDP (torchrun, accelerate launch without DeepSpeed)"
        )
    if fsdp or kind == DistributedType.FSDP:
        raise ValueError(
            "SurgeryTrainer does not run under the Trainer's FSDP: under gradient "
            "accumulation FSDP defers its reduce-scatter into one unsharded buffer that no "
            "row can own; use DDP (torchrun, accelerate launch without FSDP), or FSDP2 in "
            "your own loop with distributed=Sharded() (docs/distributed.md)"
        )
    if kind == DistributedType.NO or accelerator.num_processes == 1:
        return None
    if kind.name.startswith("MULTI_"):
        return Replicated()
    raise ValueError(
        "SurgeryTrainer runs in one process or under DDP (torchrun, accelerate launch), "
        f"not under {kind.value}"
    )


def adopt(surgery: SurgeryOptimizer[Any], chosen: Distributed) -> None:
    """Give ``surgery`` the layout ``chosen``, unless it already has one of that kind.

    A wrapper built with ``distributed=None`` gets ``chosen``, and its random generator
    (PCGrad, GradVac) the state of the first rank's, as if it had been built with it.

    Raises:
        ValueError: the wrapper was built with another kind of layout; nothing is changed.
    """
    own = surgery.distributed
    if own is not None:
        if type(own) is not type(chosen):
            raise ValueError(
                f"the {type(surgery).__name__} was built with distributed="
                f"{type(own).__name__}(...), but the Trainer runs {type(chosen).__name__} "
                "(DDP): leave distributed= unset, SurgeryTrainer sets it"
            )
        return
    _distributed.check(chosen)
    surgery.distributed = chosen
    generator = getattr(surgery, "generator", None)
    if isinstance(generator, torch.Generator):
        _distributed.broadcast_generator(generator, chosen)


def local_backward(model: nn.Module) -> AbstractContextManager[Any]:
    """``model.no_sync()`` for a DDP model (the wrapper averages the rows), else nothing."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        sync: AbstractContextManager[Any] = model.no_sync()
        return sync
    return nullcontext()


def mean_over_ranks(value: Tensor, chosen: Distributed | None) -> Tensor:
    """The mean of ``value`` over the ranks of ``chosen`` (``value`` itself in one process)."""
    if chosen is None:
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total, group=chosen.group)
    return total / torch.distributed.get_world_size(chosen.group)


def rank_file(name: str, accelerator: Accelerator) -> str:
    """``name`` in one process, ``<stem>_<rank>.<suffix>`` for each rank of several."""
    if accelerator.num_processes == 1:
        return name
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}_{accelerator.process_index}{dot}{suffix}"

"""SurgeryTrainer runs for tests/test_trainer_ddp.py: launched on two ranks, or called in one.

``python -m torch.distributed.run --nproc_per_node 2 tests/trainer_ddp_run.py OUT [NAME...]``
(or ``accelerate launch``) runs every scenario (or, given NAMEs, those wrappers' plain
runs) on the two gloo ranks and saves, per rank, the parameters and what each run saw in
``OUT/rank<r>.pt``; the NAME ``usage_error`` then ends with a usage error on rank 1.
:func:`run` is also called in the test process for the one-process run on the union of
the ranks' batches.
"""

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.optim import Optimizer
from transformers import TrainerCallback

from gradsurgery import (
    MGDA,
    GEMProjector,
    GradVac,
    NonFiniteGradientError,
    ParetoLessForgetting,
    PCGrad,
    PhasedLR,
    Uniform,
)
from gradsurgery.distributed import Sharded
from gradsurgery.integrations.transformers import SurgeryTrainer
from tests.distributed_cases import counting_collectives
from tests.trainer_setups import (
    LANGS,
    VOCAB,
    arguments,
    batches,
    examples,
    parameters,
    tagging_loss,
    tiny_bert,
)

UNION = 4  # examples per micro-batch, all ranks together
STEPS, ACCUMULATION = 3, 2
WRAPPERS = ("gem", "lfmlf", "pcgrad")  # fp32 and fp64, resumed, NaN on one rank
OTHERS = ("agem", "uniform", "gradvac", "mgda", "phased", "phased_gem", "objectives")  # fp32
ALL_REDUCE = dist.all_reduce  # DDP's hook below calls it uncounted


class Watch(TrainerCallback):
    """DDP's own all-reduce bytes per step (a comm hook), and the parameters after each step."""

    def __init__(self, trainer: SurgeryTrainer) -> None:
        self.trainer = trainer
        self.ddp_bytes: list[int] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self._pending = 0

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        model = self.trainer.model_wrapped
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model.register_comm_hook(None, self._hook)

    def _hook(
        self,
        state: object,
        bucket: dist.GradBucket,  # type: ignore[name-defined]  # DDP checks this annotation
    ) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        self._pending += buffer.numel() * buffer.element_size()
        buffer.div_(dist.get_world_size())
        work = ALL_REDUCE(buffer, async_op=True)
        return work.get_future().then(lambda future: future.value()[0])

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ddp_bytes.append(self._pending)
        self._pending = 0
        self.after.append(parameters(self.trainer.model))


def share(items: list[dict[str, torch.Tensor]], rank: int, world: int) -> list[dict[str, Any]]:
    """Rank ``rank``'s part of every batch (all of it in one process)."""
    size = UNION // world
    return [{k: v[rank * size : (rank + 1) * size] for k, v in b.items()} for b in items]


class Stream:
    """An endless stream over a list of batches that saves where it is (state_dict)."""

    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items, self.position = items, 0

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.position += 1
        return self.items[(self.position - 1) % len(self.items)]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def poisoned(rank_to_poison: int, rank: int, after: int) -> Any:
    """``tagging_loss``, NaN on ``rank_to_poison`` from its call number ``after`` on."""
    calls = [0]

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls[0] += 1
        value = tagging_loss(model, batch)
        return value * float("nan") if rank == rank_to_poison and calls[0] > after else value

    return loss


def split_objectives(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The batch's loss for "en", and for "de" the loss with every token id shifted by one."""
    shifted = {**inputs, "input_ids": (inputs["input_ids"] + 1) % VOCAB}
    return {"en": tagging_loss(model, inputs), "de": tagging_loss(model, shifted)}


def not_a_number(rank_to_fail: int, rank: int, after: int) -> Any:
    """``tagging_loss``, a 1-d tensor (a usage error) on ``rank_to_fail`` after ``after`` calls."""
    calls = [0]

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls[0] += 1
        value = tagging_loss(model, batch)
        return value.reshape(1) if rank == rank_to_fail and calls[0] > after else value

    return loss


PLAIN = {"lfmlf": ParetoLessForgetting, "uniform": Uniform, "mgda": MGDA}
SEEDED = {"pcgrad": PCGrad, "gradvac": GradVac}


def wrapper(name: str, model: nn.Module, generator: torch.Generator) -> Any:
    """``wrap`` for the wrapper ``name``; ``generator`` differs by rank (PCGrad, GradVac)."""

    def gem(inner: Optimizer, agem: bool = False) -> GEMProjector:
        constraints = ["mlm", "xsr"]
        if agem:
            return GEMProjector(inner, margin=0.0, constraints=constraints, mode="agem")
        return GEMProjector(inner, margin=0.0, constraints=constraints)

    if name in ("gem", "agem"):
        return lambda o: gem(o, name == "agem")
    if name == "phased":
        return lambda o: PhasedLR(o, model, window=1)
    if name == "phased_gem":
        return lambda o: PhasedLR(gem(o), model, window=1)
    if name == "objectives":
        return lambda o: MGDA(o, LANGS)
    if name in PLAIN:
        return lambda o: PLAIN[name](o, LANGS)
    return lambda o: SEEDED[name](o, LANGS, generator=generator)


def trainer(name: str, out: Path, rank: int, world: int, **settings: Any) -> SurgeryTrainer:
    """The SurgeryTrainer of ``name`` with each rank's share of the union's batches."""
    stream = settings.pop("stream", False)
    loss = settings.pop("loss", tagging_loss)
    dtype = settings.pop("dtype", torch.float32)

    def source(seed: int) -> Any:
        items = share(batches(3, seed=seed, size=UNION), rank, world)
        return Stream(items) if stream else items

    model = tiny_bert().to(dtype)
    wrap = wrapper(name, model, torch.Generator().manual_seed(3 + rank))
    if name in ("gem", "agem", "phased_gem"):
        sources = {"mlm": (source(7), loss), "xsr": (source(8), tagging_loss)}
    elif name == "phased":
        sources = {}
    elif name == "objectives":  # compute_objectives: two objectives from each batch
        sources = {"fr": (source(2), tagging_loss)}
    else:
        sources = {"de": (source(1), loss), "fr": (source(2), tagging_loss)}
    objective = "en" if name in PLAIN or name in SEEDED else None
    split = split_objectives if name == "objectives" else None
    options: dict[str, Any] = {
        "max_steps": STEPS,
        "per_device_train_batch_size": UNION // world,
        "gradient_accumulation_steps": ACCUMULATION,
        "train_sampling_strategy": "sequential",
        "seed": 1,
    }
    if world > 1:
        options["ddp_backend"] = "gloo"
    options.update(settings)
    surgery = SurgeryTrainer(
        model=model,
        args=arguments(out, **options),
        train_dataset=examples(UNION * STEPS * ACCUMULATION, seed=0),
        wrap=wrap,
        sources=sources,
        train_objective=objective,
        compute_objectives=split,
    )
    # BERT's forward takes **kwargs but its loss is a plain mean (docs/trainer.md)
    surgery.model_accepts_loss_kwargs = False
    surgery.add_callback(Watch(surgery))
    return surgery


def watch(trainer: SurgeryTrainer) -> Watch:
    """The :class:`Watch` of ``trainer``."""
    found = [c for c in trainer.callback_handler.callbacks if isinstance(c, Watch)]
    return found[0]


def run(
    out: Path, rank: int, world: int, faults: bool = True, names: tuple[str, ...] = WRAPPERS
) -> dict[str, Any]:
    """The scenarios of ``names`` (without ``faults``: no resume, no NaN) for the tests."""
    results: dict[str, Any] = {}
    for name in names:
        for dtype in (torch.float32, torch.float64) if name in WRAPPERS else (torch.float32,):
            tag = f"{name}/{str(dtype)[6:]}"
            log: list[tuple[str, int]] = []
            one = trainer(name, out / tag, rank, world, dtype=dtype)
            with counting_collectives(log):
                one.train()
            results[tag] = parameters(one.model)
            results[f"{tag}/collectives"] = log
            results[f"{tag}/ddp_bytes"] = watch(one).ddp_bytes
            results[f"{tag}/logs"] = one.state.log_history
        if not faults or name not in WRAPPERS:
            continue
        settings: dict[str, Any] = {
            "max_steps": 4,
            "save_strategy": "steps",
            "save_steps": 2,
            "stream": True,
        }
        whole = trainer(name, out / name / "whole", rank, world, **settings)
        whole.train()
        resumed = trainer(name, out / name / "resumed", rank, world, **settings)
        resumed.train(resume_from_checkpoint=str(out / name / "whole" / "checkpoint-2"))
        results[f"{name}/whole"] = parameters(whole.model)
        results[f"{name}/resumed"] = parameters(resumed.model)
        checkpoint = out / name / "whole" / "checkpoint-2"
        results[f"{name}/checkpoint"] = sorted(path.name for path in checkpoint.iterdir())
        # a NaN in rank 1's source loss at the second step's first micro-batch
        nan = trainer(name, out / name / "nan", rank, world, loss=poisoned(1, rank, ACCUMULATION))
        try:
            nan.train()
            results[f"{name}/nan"] = "no error"
        except NonFiniteGradientError as error:
            results[f"{name}/nan"] = type(error).__name__
        results[f"{name}/nan_step"] = nan.state.global_step
        results[f"{name}/nan_parameters"] = parameters(nan.model)
        results[f"{name}/nan_after_first_step"] = watch(nan).after[0]
    if world > 1 and faults:
        clash = trainer("gem", out / "clash", rank, world)
        clash.wrap = lambda o: GEMProjector(o, constraints=["mlm", "xsr"], distributed=Sharded())
        try:
            clash.create_optimizer()
            results["clash"] = "accepted"
        except ValueError as error:
            results["clash"] = str(error)
        results["clash_optimizer"] = clash.optimizer is None
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    target = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    chosen = tuple(sys.argv[2:])  # a few wrappers, without faults (the accelerate launch)
    usage_error = "usage_error" in chosen  # then, last: rank 1's source loss is not 0-d
    names = tuple(name for name in chosen if name != "usage_error") or WRAPPERS + OTHERS
    outcome = run(target / "runs", rank, world, faults=not chosen, names=names)
    torch.save(outcome, target / f"rank{rank}.pt")
    if usage_error:
        trainer("gem", target / "usage", rank, world, loss=not_a_number(1, rank, 2)).train()
    dist.destroy_process_group()

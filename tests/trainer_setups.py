"""Tiny SurgeryTrainer set-ups for the trainer tests: a BERT from a config, data, wrappers."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import accelerate.utils.memory
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForTokenClassification,
    TrainingArguments,
)

from gradsurgery import (
    MGDA,
    GEMProjector,
    GradVac,
    ParetoLessForgetting,
    PCGrad,
    PhasedLR,
    Uniform,
)
from gradsurgery.integrations.transformers import SurgeryTrainer

VOCAB, LABELS, LENGTH = 40, 3, 6
LANGS = ("en", "de", "fr")


@pytest.fixture(autouse=True)
def no_full_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    # Trainer.train() starts with accelerate's free_memory(), a full gc.collect() that takes
    # about a second in a pytest process; there is no device cache to free on the CPU.
    monkeypatch.setattr(accelerate.utils.memory, "clear_device_cache", lambda **_: None)


def tiny_bert(seed: int = 0) -> BertForTokenClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config.num_labels = LABELS
    return BertForTokenClassification(config)


def examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Token-tagging examples whose label is a fixed function of the token (learnable)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (LENGTH,), generator=generator)
        out.append({"input_ids": ids, "labels": (ids * (seed + 1)) % LABELS})
    return out


def batches(count: int, seed: int, size: int = 4) -> list[dict[str, torch.Tensor]]:
    data = examples(count * size, seed)
    return [
        {key: torch.stack([e[key] for e in data[i : i + size]]) for key in data[0]}
        for i in range(0, len(data), size)
    ]


def tagging_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss: torch.Tensor = model(**batch).loss
    return loss


def arguments(out: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def memory() -> dict[str, Any]:
    return {"mlm": (batches(3, seed=7), tagging_loss), "xsr": (batches(2, seed=8), tagging_loss)}


def languages() -> dict[str, Any]:
    return {"de": (batches(3, seed=1), tagging_loss), "fr": (batches(3, seed=2), tagging_loss)}


Wrap = Callable[[torch.optim.Optimizer], torch.optim.Optimizer]
MEMORY = ["mlm", "xsr"]

# name: (model -> wrap, sources, train_objective, prefixes of the logged statistics)
SETUPS: dict[str, tuple[Callable[[nn.Module], Wrap], Callable[[], Any], str | None, list[str]]] = {
    "gem": (
        lambda m: lambda o: GEMProjector(o, margin=0.0, constraints=MEMORY),
        memory,
        None,
        ["gem/"],
    ),
    "agem": (
        lambda m: lambda o: GEMProjector(o, margin=0.0, constraints=MEMORY, mode="agem"),
        memory,
        None,
        ["gem/"],
    ),
    "lfmlf": (lambda m: lambda o: ParetoLessForgetting(o, LANGS), languages, "en", ["lfmlf/"]),
    "uniform": (lambda m: lambda o: Uniform(o, LANGS), languages, "en", ["uniform/"]),
    "pcgrad": (
        lambda m: lambda o: PCGrad(o, LANGS, generator=torch.Generator().manual_seed(3)),
        languages,
        "en",
        ["pcgrad/"],
    ),
    "gradvac": (lambda m: lambda o: GradVac(o, LANGS), languages, "en", ["gradvac/"]),
    "mgda": (lambda m: lambda o: MGDA(o, LANGS), languages, "en", ["mgda/"]),
    "phased": (lambda m: lambda o: PhasedLR(o, m, window=1), dict, None, ["phased/"]),
    "phased_gem": (
        lambda m: lambda o: PhasedLR(GEMProjector(o, margin=0.0, constraints=MEMORY), m, window=1),
        memory,
        None,
        ["gem/", "phased/"],
    ),
}


def make_trainer(
    name: str, out: Path, eval_dataset: Any = None, **overrides: Any
) -> SurgeryTrainer:
    make_wrap, make_sources, objective, _ = SETUPS[name]
    model = tiny_bert()
    return SurgeryTrainer(
        model=model,
        args=arguments(out, **overrides),
        train_dataset=examples(16, seed=0),
        eval_dataset=eval_dataset,
        wrap=make_wrap(model),
        sources=make_sources(),
        train_objective=objective,
    )


def parameters(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def with_grad_scaler(trainer: SurgeryTrainer, scale: float = 2.0**12) -> torch.amp.GradScaler:
    """Give the Trainer the GradScaler that fp16 on a GPU gives it (here on the CPU)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    trainer.accelerator.scaler = scaler
    return scaler

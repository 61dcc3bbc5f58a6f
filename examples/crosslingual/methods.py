"""The rows of the table: how each method fine-tunes, as one plain training loop.

Every method fine-tunes the same token tagger (the pre-trained encoder plus a linear
layer) on the source language; they differ in the optimizer wrapper and in the memory
objectives computed each step on fresh memory batches:

=================  ==================================================================
``naive``          the task loss alone (AdamW, weight decay 0.01 as the L2 term)
``frozen``         the same with the embeddings and the bottom half of the layers frozen
``mtf-mlm``        multi-task: task loss + MLM loss on memory text
``gem-mlm``        ``GEMProjector``: the task gradient projected so the MLM loss does not
                   increase to first order
``gem-mlm-exact`` the same with the exact projection (margin 0; the other GEM rows use
                   the original GEM code's margin 0.5, ``--margin``)
``gem-xsr``        the same with the sentence-retrieval (XSR) loss on translation pairs
``gem-both``       both constraints
``agem-both``      A-GEM: one constraint, the mean of the MLM and XSR gradients (with a
                   single constraint A-GEM and GEM coincide, so A-GEM uses both)
``uniform-2src``   two source languages, the mean of their task gradients
``lfmlf-2src``     ``ParetoLessForgetting`` over the two source languages
``phased``         ``PhasedLR``: fine-tuning slow and fast
``align``          continual: task loss + α · alignment loss against the frozen original
=================  ==================================================================
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from examples.crosslingual.bundle import Bundle
from gradsurgery import GEMProjector, ParetoLessForgetting, PhasedLR, Uniform
from gradsurgery.data import MemoryBatches, ParallelCollator, tagging_examples, text_examples
from gradsurgery.objectives import (
    CrossLingualAlignment,
    MaskedLM,
    SentenceRetrieval,
    auxiliary_loss,
    encoder_of,
    frozen_copy,
)

METHODS = (
    "naive",
    "frozen",
    "mtf-mlm",
    "gem-mlm",
    "gem-mlm-exact",
    "gem-xsr",
    "gem-both",
    "agem-both",
    "uniform-2src",
    "lfmlf-2src",
    "phased",
    "align",
)
MULTI_SOURCE = ("uniform-2src", "lfmlf-2src")


@dataclass(frozen=True)
class Hyper:
    """Fine-tuning settings shared by every method."""

    steps: int = 100
    batch: int = 16
    memory_batch: int = 16
    lr: float = 5e-4
    optimizer: str = "adamw"
    margin: float = 0.5
    alpha: float = 0.01
    phase_window: int = 15


@dataclass
class Models:
    """The tagger being fine-tuned and the MLM model that shares its encoder."""

    task: PreTrainedModel
    mlm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


@dataclass
class Trace:
    """What happened during fine-tuning.

    ``memory_deltas``: per step, the change of the MLM loss on that step's memory batch
    (the batch GEM's constraint is computed on), from before the step to after it.
    ``dots_after``: GEM rows, per step, ``⟨x, g_k⟩`` for each constraint.
    """

    sources: list[str] = field(default_factory=list)
    seconds: float = 0.0
    projected: int = 0
    dots_after: list[list[float]] = field(default_factory=list)
    memory_deltas: list[float] = field(default_factory=list)


def _optimizer(method: str, models: Models, hyper: Hyper) -> torch.optim.Optimizer:
    task = models.task
    if method == "frozen":
        bottom = task.config.num_hidden_layers // 2
        for name, param in encoder_of(task).named_parameters():
            layer = re.match(r"encoder\.layer\.(\d+)\.", name)
            if name.startswith("embeddings.") or (layer and int(layer[1]) < bottom):
                param.requires_grad_(False)
    params = [p for p in task.parameters() if p.requires_grad]
    inner: torch.optim.Optimizer
    if hyper.optimizer == "sgd":
        inner = torch.optim.SGD(params, lr=hyper.lr)
    else:
        inner = torch.optim.AdamW(params, lr=hyper.lr, weight_decay=0.01)
    if "gem" in method:
        names = {"gem-xsr": ["xsr"], "gem-both": ["mlm", "xsr"], "agem-both": ["mlm", "xsr"]}
        mode: Literal["gem", "agem"] = "agem" if "agem" in method else "gem"
        margin = 0.0 if method.endswith("exact") else hyper.margin
        return GEMProjector(inner, margin, constraints=names.get(method, ["mlm"]), mode=mode)
    if method == "uniform-2src":
        return Uniform(inner, objectives=2)
    if method == "lfmlf-2src":
        return ParetoLessForgetting(inner, objectives=2)
    if method == "phased":
        return PhasedLR(inner, task, window=hyper.phase_window)
    return inner


def fine_tune(method: str, models: Models, bundle: Bundle, hyper: Hyper, seed: int) -> Trace:
    """Fine-tune ``models.task`` in place with ``method``; return what the wrapper did."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    tokenizer, task = models.tokenizer, models.task
    tag_ids = {tag: index for index, tag in enumerate(bundle.tags)}
    sources = list(bundle.train)[: 2 if method in MULTI_SOURCE else 1]
    task_batches = [
        MemoryBatches(
            tagging_examples(tokenizer, bundle.train[lang], tag_ids),
            DataCollatorForTokenClassification(tokenizer),
            batch_size=hyper.batch,
            seed=seed * 10 + index,
        )
        for index, lang in enumerate(sources)
    ]
    memory_text = MemoryBatches(
        text_examples(tokenizer, bundle.memory),
        DataCollatorForLanguageModeling(tokenizer),
        batch_size=hyper.memory_batch,
        seed=seed * 10 + 5,
    )
    memory_pairs = MemoryBatches(
        bundle.pairs, ParallelCollator(tokenizer), batch_size=hyper.memory_batch, seed=seed * 10 + 6
    )
    mlm, xsr = MaskedLM(head=models.mlm), SentenceRetrieval()
    align = CrossLingualAlignment(frozen_copy(task)) if method == "align" else None
    opt = _optimizer(method, models, hyper)
    trace, deltas = Trace(sources), []
    task.train()
    start = time.perf_counter()
    for _ in range(hyper.steps):
        opt.zero_grad()
        losses = [task(**batches.sample()).loss for batches in task_batches]
        loss = losses[0]
        probe = memory_text.sample()
        with torch.no_grad():
            before = mlm(task, probe)
        if method == "mtf-mlm":
            loss = auxiliary_loss(loss, mlm(task, probe), alpha=1.0)
        if align is not None:
            loss = auxiliary_loss(loss, align(task, memory_pairs.sample()), alpha=hyper.alpha)
        if isinstance(opt, Uniform | ParetoLessForgetting):
            opt.backward(losses)
        else:
            loss.backward()
        if isinstance(opt, GEMProjector):
            if "mlm" in opt.row_names:
                with opt.constraint("mlm"):
                    mlm(task, probe).backward()
            if "xsr" in opt.row_names:
                with opt.constraint("xsr"):
                    xsr(task, memory_pairs.sample()).backward()
        if isinstance(opt, PhasedLR):
            opt.observe(loss)
        opt.step()
        with torch.no_grad():
            deltas.append(mlm(task, probe) - before)
        if isinstance(opt, GEMProjector) and opt.last_stats is not None:
            stats = opt.last_stats
            trace.projected += int(stats.projected)
            trace.dots_after.append(stats.dots_after.tolist())
    trace.seconds = time.perf_counter() - start
    trace.memory_deltas = torch.stack(deltas).tolist()
    task.eval()
    return trace

"""What each run is scored on: tagging accuracy, MLM loss on held-out text, XSR P@1."""

from __future__ import annotations

import math

import torch
from transformers import DataCollatorForTokenClassification

from examples.crosslingual.bundle import Bundle
from examples.crosslingual.methods import Models
from gradsurgery.data import IGNORE_INDEX, ParallelCollator, TaggedSentence, tagging_examples
from gradsurgery.objectives import evaluating, mlm_perplexity
from gradsurgery.objectives.xsr import retrieval_precision

EVAL_BATCH = 64


def accuracy(models: Models, sentences: list[TaggedSentence], tags: tuple[str, ...]) -> float:
    """The share of words whose predicted tag (on its first sub-word) is right."""
    tag_ids = {tag: index for index, tag in enumerate(tags)}
    examples = tagging_examples(models.tokenizer, sentences, tag_ids)
    collate = DataCollatorForTokenClassification(models.tokenizer)
    right = total = 0
    with evaluating(models.task):
        for start in range(0, len(examples), EVAL_BATCH):
            batch = collate(examples[start : start + EVAL_BATCH])
            labels = batch.pop("labels")
            predicted = models.task(**batch).logits.argmax(-1)
            counted = labels != IGNORE_INDEX
            right += int((predicted == labels)[counted].sum())
            total += int(counted.sum())
    return right / total


def memory_scores(models: Models, bundle: Bundle) -> dict[str, dict[str, float]]:
    """MLM loss per language on held-out text (fixed masks) and XSR P@1 per target."""
    mlm = {
        lang: math.log(mlm_perplexity(models.mlm, models.tokenizer, texts, seed=0))
        for lang, texts in bundle.memory_eval.items()
    }
    collate = ParallelCollator(models.tokenizer)
    xsr = {
        lang: retrieval_precision(models.task, collate, pairs, ks=(1,), batch_size=EVAL_BATCH)[1]
        for lang, pairs in bundle.pairs_eval.items()
    }
    return {"mlm_loss": mlm, "xsr_p1": xsr}


def scores(models: Models, bundle: Bundle) -> dict[str, dict[str, float]]:
    """Accuracy per language, and :func:`memory_scores`."""
    torch.manual_seed(0)
    acc = {lang: accuracy(models, s, bundle.tags) for lang, s in bundle.test.items()}
    return {"accuracy": acc, **memory_scores(models, bundle)}

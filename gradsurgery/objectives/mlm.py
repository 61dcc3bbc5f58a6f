r"""Masked language modelling on memory text: the loss, and perplexity for evaluation.

Liu et al. (2021) constrain fine-tuning with the masked-LM loss the model was pre-trained
on (GEM w/ MLM), on a batch of memory text (Wikipedia) each step, and report MLM perplexity
before and after fine-tuning (Table 1). With :math:`M` the masked positions of a batch,

.. math::

    L_{\text{MLM}} = -\frac{1}{|M|} \sum_{t \in M} \log p_\theta(x_t \mid \tilde x),

where :math:`\tilde x` is the masked input; the perplexity of a corpus is
:math:`\exp L_{\text{MLM}}` with :math:`M` all its masked positions. Masking is transformers' own
``DataCollatorForLanguageModeling`` (BERT's 15 % of the sub-words, of which 80 % become
``[MASK]``, 10 % a random token, 10 % stay); give it a ``seed`` for reproducible masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from gradsurgery.checks import finite_number, positive_int
from gradsurgery.data.encoding import IGNORE_INDEX, text_examples
from gradsurgery.data.sampling import DEFAULT_BATCH_SIZE
from gradsurgery.objectives.encoders import evaluating

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["mlm_loss", "mlm_perplexity"]


def _masked_nll(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The summed negative log-likelihood of the masked tokens, and their number."""
    missing = {"input_ids", "attention_mask", "labels"} - set(batch)
    if missing:
        raise ValueError(
            f"the batch has no {sorted(missing)}: make it with DataCollatorForLanguageModeling"
        )
    logits = getattr(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), "logits", None
    )
    if not isinstance(logits, Tensor):
        raise TypeError(f"{type(model).__name__} returns no .logits: pass a masked-LM model")
    labels = batch["labels"]
    total = cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (labels != IGNORE_INDEX).sum()


def mlm_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The mean masked-LM loss over the masked tokens of ``batch``, a 0-d tensor.

    Args:
        model: a masked-LM model (``AutoModelForMaskedLM``), usually sharing its encoder
            with the task model (:func:`~gradsurgery.objectives.share_encoder`).
        batch: ``input_ids``, ``attention_mask`` and ``labels`` as made by
            ``DataCollatorForLanguageModeling`` (``-100`` where nothing is masked).

    Returns:
        The model's own MLM loss (cross-entropy in float32); 0 when nothing is masked
        (instead of NaN), so that a rare empty mask cannot stop training.

    Raises:
        ValueError: the batch lacks a key.
        TypeError: the model returns no logits.
    """
    total, count = _masked_nll(model, batch)
    return total / count.clamp(min=1)


def mlm_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mlm_probability: float = 0.15,
    seed: int = 0,
    max_length: int = 128,
) -> float:
    """Masked-LM perplexity of ``model`` on ``texts``: exp of the mean loss per masked token.

    The masks come from a ``DataCollatorForLanguageModeling`` seeded with ``seed``, so two
    evaluations of the same texts (before and after fine-tuning) mask the same tokens.
    Every masked token counts once, whatever its batch. The model runs in eval mode
    without gradients; every module's mode is restored afterwards.

    Raises:
        ValueError: bad options, no text, or no token masked at all.
    """
    from transformers import DataCollatorForLanguageModeling

    positive_int(batch_size, "batch_size")
    finite_number(mlm_probability, "mlm_probability", low=0, high=1, strict=True)
    examples = text_examples(tokenizer, texts, max_length=max_length)
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=mlm_probability, seed=seed
    )
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            batch = collator(examples[start : start + batch_size])
            nll, masked = _masked_nll(
                model, {key: value.to(device) for key, value in batch.items()}
            )
            total += nll
            count += masked
    if int(count) == 0:
        raise ValueError("no token was masked: give more text or a higher mlm_probability")
    return math.exp(float(total) / int(count))

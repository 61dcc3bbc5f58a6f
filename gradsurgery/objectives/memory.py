r"""One interface for every memory objective: ``objective(model, batch) -> loss``.

Each objective is a callable object holding its settings, so that a training loop, the
Trainer integration or an example can use any of them the same way, in three ways:

.. code-block:: python

    mlm = MaskedLM(head=share_encoder(mlm_model, model))
    memory = MemoryBatches(text_examples(tokenizer, texts),
                           DataCollatorForLanguageModeling(tokenizer), seed=0)

    # 1. a GEM constraint (Liu et al., 2021)
    opt = GEMProjector(torch.optim.AdamW(params, lr=1e-5), constraints=["mlm"])
    opt.zero_grad()
    task_loss.backward()
    with opt.constraint("mlm"):
        mlm(model, memory.sample()).backward()
    opt.step()

    # 2. LF-MLF objectives, one per language (Mao et al., 2022)
    opt = ParetoLessForgetting(torch.optim.AdamW(params, lr=1e-5), objectives=["en", "de"])
    opt.backward({"en": mlm(model, memory_en.sample()), "de": mlm(model, memory_de.sample())})

    # 3. an auxiliary loss ("continual", Efimov et al., 2022): L = L_task + α·L_align
    align = CrossLingualAlignment(frozen_copy(model))
    auxiliary_loss(task_loss, align(model, pairs.sample())).backward()
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from gradsurgery.checks import finite_number
from gradsurgery.data.encoding import ParallelBatch
from gradsurgery.objectives.alignment import (
    DEFAULT_PULL_WEIGHT,
    DEFAULT_STAY_WEIGHT,
    alignment_loss,
)
from gradsurgery.objectives.encoders import encoder_of
from gradsurgery.objectives.mlm import mlm_loss
from gradsurgery.objectives.xsr import DEFAULT_TEMPERATURE, xsr_loss

__all__ = [
    "DEFAULT_ALPHA",
    "CrossLingualAlignment",
    "MaskedLM",
    "MemoryObjective",
    "SentenceRetrieval",
    "auxiliary_loss",
]

DEFAULT_ALPHA = 0.01
"""Weight :math:`\\alpha` of an auxiliary memory loss ("continual" in Efimov et al., 2022)."""


@runtime_checkable
class MemoryObjective(Protocol):
    """A memory loss of a model on one batch: ``objective(model, batch)`` → 0-d tensor."""

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """The loss of ``model`` on ``batch``, differentiable in the model's parameters."""
        ...


class MaskedLM:
    r"""Masked-LM loss on memory text (:func:`~gradsurgery.objectives.mlm_loss`).

    Batches come from ``DataCollatorForLanguageModeling`` (e.g. through
    :class:`~gradsurgery.data.MemoryBatches`).

    Args:
        head: the masked-LM model whose loss is taken, sharing its encoder with the model
            being fine-tuned (:func:`~gradsurgery.objectives.share_encoder`). ``None``:
            the model passed at each call is itself a masked-LM model.

    Raises:
        ValueError: at a call, ``head`` does not run on the given model's encoder.
    """

    def __init__(self, head: nn.Module | None = None) -> None:
        self.head = head

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        """The mean masked-LM loss of ``batch``."""
        if self.head is None:
            return mlm_loss(model, batch)
        if encoder_of(self.head) is not encoder_of(model):
            raise ValueError(
                f"the MLM head {type(self.head).__name__} does not share the encoder of "
                f"{type(model).__name__}: make it with share_encoder(head, model)"
            )
        return mlm_loss(self.head, batch)

    def __repr__(self) -> str:
        return f"MaskedLM(head={type(self.head).__name__ if self.head is not None else None})"


class SentenceRetrieval:
    r"""In-batch contrastive sentence-retrieval loss (:func:`~gradsurgery.objectives.xsr_loss`).

    Batches are :class:`~gradsurgery.data.ParallelBatch` (translation pairs).

    Args:
        temperature: :math:`\tau > 0` (default 0.05).
        symmetric: average the source → target and target → source losses.

    Raises:
        ValueError: a bad ``temperature``.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, *, symmetric: bool = False):
        self.temperature = finite_number(temperature, "temperature", low=0, strict=True)
        self.symmetric = bool(symmetric)

    def __call__(self, model: nn.Module, batch: ParallelBatch) -> Tensor:
        """The XSR loss of ``batch``."""
        return xsr_loss(model, batch, temperature=self.temperature, symmetric=self.symmetric)

    def __repr__(self) -> str:
        return f"SentenceRetrieval(temperature={self.temperature}, symmetric={self.symmetric})"


class CrossLingualAlignment:
    """Alignment loss against a frozen original (:func:`~gradsurgery.objectives.alignment_loss`).

    Batches are :class:`~gradsurgery.data.ParallelBatch` with word alignments.

    Args:
        frozen: the original model, e.g. ``frozen_copy(model)`` before fine-tuning.
        pull_weight: weight of the pull term (0.01).
        stay_weight: weight of the stay term (1).

    Raises:
        ValueError: a negative or non-finite weight.
    """

    def __init__(
        self,
        frozen: nn.Module,
        *,
        pull_weight: float = DEFAULT_PULL_WEIGHT,
        stay_weight: float = DEFAULT_STAY_WEIGHT,
    ) -> None:
        self.frozen = frozen
        self.pull_weight = finite_number(pull_weight, "pull_weight", low=0)
        self.stay_weight = finite_number(stay_weight, "stay_weight", low=0)

    def __call__(self, model: nn.Module, batch: ParallelBatch) -> Tensor:
        r"""The alignment loss of ``batch``."""
        return alignment_loss(
            model,
            self.frozen,
            batch,
            pull_weight=self.pull_weight,
            stay_weight=self.stay_weight,
        )

    def __repr__(self) -> str:
        return (
            f"CrossLingualAlignment(pull_weight={self.pull_weight}, stay_weight={self.stay_weight})"
        )


def auxiliary_loss(task_loss: Tensor, memory_loss: Tensor, alpha: float = DEFAULT_ALPHA) -> Tensor:
    r"""``task_loss + alpha · memory_loss``: a memory objective as an auxiliary loss.

    The "continual" fine-tuning of Efimov et al. (2022),
    :math:`L = L_{\text{task}} + \alpha L_{\text{align}}` with :math:`\alpha = 0.01`; with MLM
    or XSR it is the multi-task baseline (MTF) of Liu et al. (2021) for a suitable :math:`\alpha`.

    Raises:
        ValueError: a negative or non-finite ``alpha``, or losses that are not 0-d.
    """
    alpha = finite_number(alpha, "alpha", low=0)
    if task_loss.dim() != 0 or memory_loss.dim() != 0:
        raise ValueError(
            f"both losses must be 0-d tensors, got shapes {tuple(task_loss.shape)} and "
            f"{tuple(memory_loss.shape)}"
        )
    return task_loss + alpha * memory_loss

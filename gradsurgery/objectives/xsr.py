r"""Cross-lingual sentence retrieval (XSR): a contrastive loss and P@k evaluation.

Liu et al. (2021) constrain fine-tuning with a sentence-retrieval task on translation pairs
(Europarl) and report P@1/5/10: "the fraction of pairs for which the correct translation of
the source language sentence is in the k nearest neighbours" (Appendix A). The papers do
not spell out the training loss; the project uses the in-batch contrastive loss (InfoNCE)
on mean-pooled last-layer sentence vectors. With :math:`u_i, v_j` the vectors of source
sentence :math:`i` and target sentence :math:`j` of a batch of :math:`n` pairs, and
:math:`s_{ij} = \cos(u_i, v_j) / \tau`,

.. math::

    L_{\text{XSR}} = -\frac{1}{n} \sum_{i=1}^{n} \log
        \frac{\exp s_{ii}}{\sum_{j=1}^{n} \exp s_{ij}},

each source sentence retrieving its own translation among the batch's targets
(``symmetric=True`` averages it with the target → source direction). The temperature
:math:`\tau` defaults to 0.05 (SimCSE's value, Gao et al., 2021).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy, normalize

from gradsurgery.checks import finite_number, positive_int
from gradsurgery.data.encoding import ParallelBatch, WordEncoding
from gradsurgery.data.parallel import SentencePair
from gradsurgery.data.sampling import DEFAULT_BATCH_SIZE
from gradsurgery.objectives.encoders import evaluating, last_hidden_state
from gradsurgery.objectives.pooling import mean_pool

__all__ = [
    "DEFAULT_TEMPERATURE",
    "precision_at_k",
    "retrieval_precision",
    "sentence_vectors",
    "xsr_loss",
]

DEFAULT_TEMPERATURE = 0.05
"""Temperature :math:`\\tau` of the XSR contrastive loss."""


def sentence_vectors(model: nn.Module, encoding: WordEncoding) -> Tensor:
    """``(batch, hidden)``: the mean of each sentence's last-layer sub-word vectors.

    Special tokens (``[CLS]``, ``[SEP]``) count, padding does not.
    """
    hidden = last_hidden_state(model, encoding.input_ids, encoding.attention_mask)
    return mean_pool(hidden, encoding.attention_mask)


def xsr_loss(
    model: nn.Module,
    batch: ParallelBatch,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    symmetric: bool = False,
) -> Tensor:
    r"""The in-batch contrastive sentence-retrieval loss of ``batch``, a 0-d tensor.

    Args:
        model: a transformers model (its encoder runs on both sides).
        batch: translation pairs from a :class:`~gradsurgery.data.ParallelCollator`.
        temperature: :math:`\tau > 0`, dividing the cosine similarities.
        symmetric: also retrieve each source from its target, and average both losses.

    Raises:
        ValueError: a bad ``temperature``, or fewer than two pairs (one pair has nothing
            to be told apart from: its loss would be 0 whatever the model).
    """
    scale = 1.0 / finite_number(temperature, "temperature", low=0, strict=True)
    if len(batch) < 2:
        raise ValueError(
            f"sentence retrieval needs at least 2 pairs in a batch, got {len(batch)}: each "
            "source must be told apart from the other pairs' targets"
        )
    source = normalize(sentence_vectors(model, batch.source).float(), dim=-1)
    target = normalize(sentence_vectors(model, batch.target).float(), dim=-1)
    logits = source @ target.T * scale
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + cross_entropy(logits.T, labels)) / 2
    return loss


def precision_at_k(
    source: Tensor, target: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """P@k of retrieving ``target[i]`` for ``source[i]`` by cosine among all ``target``.

    P@k is the fraction of sources whose own target is among the ``k`` targets most
    similar to them; a tie with the right target counts against it (the rank is 1 + the
    number of other targets at least as similar).

    Args:
        source: ``(n, hidden)`` sentence vectors.
        target: ``(n, hidden)`` vectors of their translations, in the same order.
        ks: the ``k`` to report, each ≥ 1.

    Returns:
        ``{k: P@k}`` with values in ``[0, 1]``.

    Raises:
        ValueError: shapes that are not two matching ``(n, hidden)``, or a bad ``k``.
    """
    if source.dim() != 2 or source.shape != target.shape or source.shape[0] == 0:
        raise ValueError(
            "source and target must be (n, hidden) with n ≥ 1 and the same shape, got "
            f"{tuple(source.shape)} and {tuple(target.shape)}"
        )
    if not ks:
        raise ValueError("ks is empty")
    for k in ks:
        positive_int(k, "each k")
    similarity = normalize(source.double(), dim=-1) @ normalize(target.double(), dim=-1).T
    own = similarity.diagonal().unsqueeze(1)
    rank = (similarity >= own).sum(dim=1)  # the own target counts itself: rank ≥ 1
    return {k: float((rank <= k).double().mean()) for k in ks}


def retrieval_precision(
    model: nn.Module,
    collate: Callable[[Sequence[SentencePair]], ParallelBatch],
    pairs: Sequence[SentencePair],
    *,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[int, float]:
    """P@k of sentence retrieval over a whole evaluation set, as in Liu et al. (2021).

    Every source sentence of ``pairs`` retrieves among *all* their target sentences (not
    within a batch). The model runs in eval mode without gradients; every module's mode is
    restored afterwards.

    Args:
        model: a transformers model.
        collate: turns pairs into a batch, e.g. a :class:`~gradsurgery.data.ParallelCollator`.
        pairs: the evaluation pairs (Liu et al., 2021, hold out 10 % of Europarl).
        ks: the ``k`` to report.
        batch_size: pairs encoded at once.

    Raises:
        ValueError: no pair, or a bad ``k`` or ``batch_size``.
    """
    positive_int(batch_size, "batch_size")
    if not pairs:
        raise ValueError("no sentence pair to evaluate")
    device = next(model.parameters()).device
    sources, targets = [], []
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            batch = collate(pairs[start : start + batch_size]).to(device)
            sources.append(sentence_vectors(model, batch.source))
            targets.append(sentence_vectors(model, batch.target))
    return precision_at_k(torch.cat(sources), torch.cat(targets), ks)

"""Pooling sub-word vectors: into one vector per sentence, or one per word."""

from __future__ import annotations

from torch import Tensor

__all__ = ["mean_pool", "word_pool"]


def _check_hidden(hidden: Tensor, positions: Tensor, name: str) -> None:
    if hidden.dim() != 3 or positions.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be (batch, length, hidden) and {name} (batch, length), got "
            f"{tuple(hidden.shape)} and {tuple(positions.shape)}"
        )


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    r"""Sentence vectors: the mean of each sentence's sub-word vectors, padding left out.

    .. math:: v = \frac{\sum_t m_t h_t}{\sum_t m_t}

    Args:
        hidden: ``(batch, length, hidden)`` last-layer vectors.
        attention_mask: ``(batch, length)``, 1 on sub-words (special tokens included) and
            0 on padding.

    Returns:
        ``(batch, hidden)``; zero for a sentence with no sub-word.

    Raises:
        ValueError: the shapes do not match.
    """
    _check_hidden(hidden, attention_mask, "attention_mask")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def word_pool(hidden: Tensor, word_index: Tensor, num_words: int) -> Tensor:
    r"""Word vectors: the mean of each word's sub-word vectors (Efimov et al., 2022, "avg").

    .. math:: f(w) = \frac{1}{|S_w|} \sum_{t \in S_w} h_t

    where :math:`S_w` are the positions whose ``word_index`` is ``w``. Runs on the device
    without reading anything back to the host.

    Args:
        hidden: ``(batch, length, hidden)`` last-layer vectors.
        word_index: ``(batch, length)`` long: the word (``0 … num_words − 1``) of each
            position, ``-1`` for positions that belong to no word.
        num_words: the number of words.

    Returns:
        ``(num_words, hidden)``; zero for a word with no position.

    Raises:
        ValueError: the shapes do not match.
    """
    _check_hidden(hidden, word_index, "word_index")
    rows = word_index.reshape(-1)
    rows = rows.where(rows >= 0, num_words)  # positions of no word go to a discarded row
    vectors = hidden.reshape(-1, hidden.shape[-1])
    sums = vectors.new_zeros(num_words + 1, vectors.shape[1]).index_add(0, rows, vectors)
    counts = vectors.new_zeros(num_words + 1).index_add(0, rows, vectors.new_ones(rows.shape))
    return (sums / counts.clamp(min=1).unsqueeze(1))[:num_words]

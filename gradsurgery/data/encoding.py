"""Words to sub-word ids: examples for the transformers collators, and parallel batches.

Token classification labels the first sub-word of each word and gives the others (and the
special tokens) the label ``-100``, which the loss ignores. Word-level objectives pool each
word's sub-word vectors; :class:`WordEncoding` says which word every sub-word belongs to.
Mapping sub-words to words needs a fast tokenizer (its ``word_ids``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradsurgery.checks import positive_int
from gradsurgery.data.parallel import SentencePair
from gradsurgery.data.tagging import TaggedSentence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "ParallelBatch",
    "ParallelCollator",
    "WordEncoding",
    "encode_words",
    "tagging_examples",
    "text_examples",
]

IGNORE_INDEX = -100
"""The label of positions the loss ignores (``torch.nn.CrossEntropyLoss``'s default)."""

Example = dict[str, list[int]]


def _require_fast(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: mapping sub-words to words "
            "needs one (backed by the tokenizers library, with word_ids())"
        )


def _split(encoded: Mapping[str, list[list[int]]], count: int) -> list[Example]:
    return [{key: list(values[index]) for key, values in encoded.items()} for index in range(count)]


def tagging_examples(
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[TaggedSentence],
    tag_ids: Mapping[str, int],
    *,
    max_length: int = 128,
) -> list[Example]:
    """One example per sentence for ``DataCollatorForTokenClassification`` (or a Trainer).

    Each example holds the tokenizer's fields (``input_ids``, ``attention_mask``, …) and
    ``labels``: the word's tag id on its first sub-word, ``-100`` on its other sub-words
    and on special tokens. Sentences longer than ``max_length`` sub-words are truncated.

    Raises:
        ValueError: a slow tokenizer, a bad ``max_length``, or a tag missing from
            ``tag_ids`` (naming the sentence).
    """
    _require_fast(tokenizer)
    positive_int(max_length, "max_length")
    for index, sentence in enumerate(sentences):
        unknown = sorted(set(sentence.tags) - set(tag_ids))
        if unknown:
            raise ValueError(f"sentence {index} has tags {unknown} that are not in tag_ids")
    encoded = tokenizer(
        [list(sentence.words) for sentence in sentences],
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
    )
    examples = _split(encoded, len(sentences))
    for index, (sentence, example) in enumerate(zip(sentences, examples, strict=True)):
        labels = []
        previous = None
        for word in encoded.word_ids(index):
            first = word is not None and word != previous
            labels.append(tag_ids[sentence.tags[word]] if first else IGNORE_INDEX)
            previous = word
        example["labels"] = labels
    return examples


def text_examples(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, max_length: int = 128
) -> list[Example]:
    """One example per text for ``DataCollatorForLanguageModeling`` (memory text for MLM).

    The examples carry ``special_tokens_mask`` so that the collator never masks ``[CLS]``,
    ``[SEP]`` or padding. Texts longer than ``max_length`` sub-words are truncated.

    Raises:
        ValueError: no text, or a bad ``max_length``.
    """
    positive_int(max_length, "max_length")
    if not texts:
        raise ValueError("texts is empty")
    encoded = tokenizer(
        list(texts), truncation=True, max_length=max_length, return_special_tokens_mask=True
    )
    return _split(encoded, len(texts))


@dataclass(frozen=True)
class WordEncoding:
    """Padded sub-word ids of a batch of sentences, and the word of every sub-word.

    The words of the whole batch are numbered sentence after sentence (``0 … num_words −
    1``), so that their vectors can be pooled into one ``(num_words, hidden)`` tensor.
    A word cut off by truncation gets no number.

    Attributes:
        input_ids: ``(batch, length)`` sub-word ids.
        attention_mask: ``(batch, length)``: 1 on sub-words, 0 on padding.
        word_index: ``(batch, length)``: the number of each sub-word's word, ``-1`` on
            special tokens and padding.
        num_words: how many words are numbered.
    """

    input_ids: Tensor
    attention_mask: Tensor
    word_index: Tensor
    num_words: int

    def to(self, device: torch.device | str) -> WordEncoding:
        """The same encoding on ``device``."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            word_index=self.word_index.to(device),
        )


def _encode(
    tokenizer: PreTrainedTokenizerBase, sentences: Sequence[Sequence[str]], max_length: int
) -> tuple[WordEncoding, list[dict[int, int]]]:
    """The encoding, and per sentence the number of each of its words that was kept."""
    encoded = tokenizer(
        [list(words) for words in sentences],
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    rows, numbers = [], []
    total = 0
    for index in range(len(sentences)):
        word_ids = encoded.word_ids(index)
        kept = sorted({word for word in word_ids if word is not None})
        number = {word: total + rank for rank, word in enumerate(kept)}
        rows.append([-1 if word is None else number[word] for word in word_ids])
        numbers.append(number)
        total += len(kept)
    encoding = WordEncoding(
        encoded["input_ids"], encoded["attention_mask"], torch.tensor(rows), total
    )
    return encoding, numbers


def encode_words(
    tokenizer: PreTrainedTokenizerBase, sentences: Sequence[Sequence[str]], *, max_length: int = 128
) -> WordEncoding:
    """Tokenize sentences given as words into a :class:`WordEncoding`.

    Raises:
        ValueError: a slow tokenizer, no sentence, or a bad ``max_length``.
    """
    _require_fast(tokenizer)
    positive_int(max_length, "max_length")
    if not sentences:
        raise ValueError("sentences is empty")
    return _encode(tokenizer, sentences, max_length)[0]


@dataclass(frozen=True)
class ParallelBatch:
    """Sentence pairs encoded for sentence retrieval and the alignment loss.

    Attributes:
        source: the source sentences.
        target: their translations.
        source_words: ``(links,)``: for each alignment link, its source word's number in
            ``source`` (see :class:`WordEncoding`).
        target_words: ``(links,)``: the linked target word's number in ``target``.
    """

    source: WordEncoding
    target: WordEncoding
    source_words: Tensor
    target_words: Tensor

    def __len__(self) -> int:
        return int(self.source.input_ids.shape[0])

    def to(self, device: torch.device | str) -> ParallelBatch:
        """The same batch on ``device``."""
        return ParallelBatch(
            self.source.to(device),
            self.target.to(device),
            self.source_words.to(device),
            self.target_words.to(device),
        )


class ParallelCollator:
    """Turn a list of :class:`SentencePair` into a :class:`ParallelBatch` (a ``collate_fn``).

    Links whose source or target word was cut off by truncation are dropped.

    Args:
        tokenizer: a fast tokenizer.
        max_length: the most sub-words kept per sentence, special tokens included.

    Raises:
        ValueError: a slow tokenizer or a bad ``max_length``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 128) -> None:
        _require_fast(tokenizer)
        self.tokenizer = tokenizer
        self.max_length = positive_int(max_length, "max_length")

    def __call__(self, pairs: Sequence[SentencePair]) -> ParallelBatch:
        """Encode ``pairs``; ``ValueError`` if there is none."""
        if not pairs:
            raise ValueError("no sentence pair to collate")
        source, source_numbers = _encode(
            self.tokenizer, [pair.source for pair in pairs], self.max_length
        )
        target, target_numbers = _encode(
            self.tokenizer, [pair.target for pair in pairs], self.max_length
        )
        links = [
            (source_number[i], target_number[j])
            for pair, source_number, target_number in zip(
                pairs, source_numbers, target_numbers, strict=True
            )
            for i, j in pair.alignment
            if i in source_number and j in target_number
        ]
        words = torch.tensor(links, dtype=torch.long).reshape(-1, 2)
        return ParallelBatch(source, target, words[:, 0], words[:, 1])

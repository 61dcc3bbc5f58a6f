"""Parallel text (two aligned files, one sentence per line) and word alignments (``i-j``).

Sentence retrieval (XSR, Liu et al. 2021) needs translation pairs; the alignment loss
(Cao et al. 2020, as used by Efimov et al. 2022) needs word pairs ``(s_i, t_j)`` from a word aligner
such as fast_align (Dyer et al., 2013), whose output has one line per sentence pair of
space-separated ``i-j`` tokens: source word ``i`` is aligned with target word ``j``
(0-based). Both files are tokenized: words are separated by whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gradsurgery.data.text import PathLike, line_error, read_lines

__all__ = ["SentencePair", "pairs_from_records", "parse_alignment", "read_parallel"]

_LINK = re.compile(r"([0-9]+)-([0-9]+)")


@dataclass(frozen=True)
class SentencePair:
    """A source sentence, its translation and, optionally, their word alignment.

    Attributes:
        source: the source sentence's words: the fine-tuning language (English in the
            papers), whose word vectors the alignment loss keeps close to the frozen model's.
        target: the translation's words.
        alignment: ``(i, j)`` links: ``source[i]`` is aligned with ``target[j]``.

    Raises:
        ValueError: an empty sentence or word, a link outside the sentences, or a link
            given twice.
    """

    source: tuple[str, ...]
    target: tuple[str, ...]
    alignment: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.source or not self.target:
            raise ValueError("both sentences need at least one word")
        if not all(isinstance(word, str) and word for word in (*self.source, *self.target)):
            raise ValueError("words must be non-empty strings")
        for i, j in self.alignment:
            if not (0 <= i < len(self.source) and 0 <= j < len(self.target)):
                raise ValueError(
                    f"link {i}-{j} is outside the sentences: the source has {len(self.source)} "
                    f"words and the target {len(self.target)} (indices start at 0)"
                )
        if len(set(self.alignment)) != len(self.alignment):
            raise ValueError("a link is given twice")


def parse_alignment(text: str) -> tuple[tuple[int, int], ...]:
    """The links of one line of aligner output: ``"0-0 1-2"`` → ``((0, 0), (1, 2))``.

    Raises:
        ValueError: a token that is not ``i-j`` with non-negative integers.
    """
    links = []
    for token in text.split():
        match = _LINK.fullmatch(token)
        if match is None:
            raise ValueError(f"{token!r} is not a link i-j of two word indices")
        links.append((int(match[1]), int(match[2])))
    return tuple(links)


def read_parallel(
    source: PathLike, target: PathLike, alignments: PathLike | None = None
) -> list[SentencePair]:
    """Sentence pairs from two aligned files and, optionally, their word alignments.

    Line ``n`` of ``target`` translates line ``n`` of ``source``; line ``n`` of
    ``alignments`` (fast_align output) links their words, and may be empty.

    Raises:
        ValueError: the files have different numbers of lines, an empty sentence, or a
            malformed or out-of-range link (naming the file and line).
    """
    sources, targets = read_lines(source), read_lines(target)
    if len(sources) != len(targets):
        raise ValueError(
            f"{source} has {len(sources)} lines but {target} has {len(targets)}: parallel "
            "files need one sentence per line, in the same order"
        )
    links: list[str] = [""] * len(sources)
    if alignments is not None:
        links = read_lines(alignments)
        if len(links) != len(sources):
            raise ValueError(
                f"{alignments} has {len(links)} lines but the parallel files have {len(sources)}"
            )
    pairs = []
    for number, (left, right, line) in enumerate(
        zip(sources, targets, links, strict=True), start=1
    ):
        for path, sentence in ((source, left), (target, right)):
            if not sentence.strip():
                raise line_error(path, number, "empty sentence")
        try:
            alignment = parse_alignment(line)
            pairs.append(SentencePair(tuple(left.split()), tuple(right.split()), alignment))
        except ValueError as error:
            raise line_error(alignments or source, number, str(error)) from None
    if not pairs:
        raise ValueError(f"{source}: holds no sentence")
    return pairs


def pairs_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    source: str,
    target: str,
    field: str | None = "translation",
) -> list[SentencePair]:
    """Sentence pairs from records such as the rows of a ``datasets.Dataset``.

    Translation datasets on the Hugging Face hub hold ``{"translation": {"en": …, "es": …}}``
    per row (``field="translation"``, the default); with ``field=None`` the languages are
    the records' own keys. Sentences are split into words at whitespace.

    Raises:
        ValueError: a record without the languages, or an empty sentence (naming the record).
    """
    pairs = []
    for index, record in enumerate(records):
        texts = record if field is None else record.get(field, {})
        if not (
            isinstance(texts, Mapping)
            and isinstance(texts.get(source), str)
            and isinstance(texts.get(target), str)
        ):
            where = "the record" if field is None else f"its {field!r} field"
            raise ValueError(f"record {index}: {where} has no {source!r} and {target!r} sentences")
        try:
            pairs.append(SentencePair(tuple(texts[source].split()), tuple(texts[target].split())))
        except ValueError as error:
            raise ValueError(f"record {index}: {error}") from None
    return pairs

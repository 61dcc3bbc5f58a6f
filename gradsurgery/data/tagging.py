"""Token-classification corpora: CoNLL-U (part-of-speech tags) and CoNLL (named entities).

Liu et al. (2021) fine-tune on English POS tagging (Universal Dependencies) and NER
(CoNLL-2003 / WikiANN) and evaluate zero-shot in other languages; these readers turn such
files into :class:`TaggedSentence` objects, one word and one tag per position.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradsurgery.data.text import PathLike, line_error, read_lines

__all__ = [
    "UPOS_TAGS",
    "TaggedSentence",
    "read_conll",
    "read_conllu",
    "tag_vocabulary",
    "tagged_from_records",
]

UPOS_TAGS: tuple[str, ...] = (
    "ADJ",
    "ADP",
    "ADV",
    "AUX",
    "CCONJ",
    "DET",
    "INTJ",
    "NOUN",
    "NUM",
    "PART",
    "PRON",
    "PROPN",
    "PUNCT",
    "SCONJ",
    "SYM",
    "VERB",
    "X",
)
"""The 17 universal part-of-speech tags of Universal Dependencies v2, in their order."""

_MULTIWORD_RANGE = re.compile(r"[1-9][0-9]*-[1-9][0-9]*")
_EMPTY_NODE = re.compile(r"[0-9]+\.[1-9][0-9]*")


@dataclass(frozen=True)
class TaggedSentence:
    """A sentence as words with one tag each.

    Raises:
        ValueError: no word, an empty word or tag, or not one tag per word.
    """

    words: tuple[str, ...]
    tags: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.words:
            raise ValueError("a sentence needs at least one word")
        if len(self.words) != len(self.tags):
            raise ValueError(f"{len(self.words)} words but {len(self.tags)} tags")
        if not all(isinstance(item, str) and item for item in (*self.words, *self.tags)):
            raise ValueError("words and tags must be non-empty strings")


def read_conllu(path: PathLike) -> list[TaggedSentence]:
    """The sentences of a CoNLL-U file, with each word's form and universal POS tag.

    Comment lines (``#``) are skipped, as are multi-word token ranges (``1-2``: their
    words follow on their own lines) and empty nodes (``8.1``). Word IDs must count
    ``1, 2, …`` within each sentence, and UPOS must be one of :data:`UPOS_TAGS`.

    Raises:
        ValueError: a malformed line (naming the file and line) or no sentence at all.
    """
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            if words:
                sentences.append(TaggedSentence(tuple(words), tuple(tags)))
                words, tags = [], []
            continue
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 10:
            raise line_error(path, number, f"expected 10 tab-separated columns, got {len(fields)}")
        token_id, form, _, upos = fields[:4]
        if _MULTIWORD_RANGE.fullmatch(token_id) or _EMPTY_NODE.fullmatch(token_id):
            continue
        if token_id != str(len(words) + 1):
            raise line_error(path, number, f"expected word ID {len(words) + 1}, got {token_id!r}")
        if upos not in UPOS_TAGS:
            raise line_error(
                path, number, f"UPOS {upos!r} is not one of the 17 UD tags {', '.join(UPOS_TAGS)}"
            )
        if not form:
            raise line_error(path, number, "empty word form")
        words.append(form)
        tags.append(upos)
    if words:
        sentences.append(TaggedSentence(tuple(words), tuple(tags)))
    if not sentences:
        raise ValueError(f"{path}: holds no sentence")
    return sentences


def read_conll(path: PathLike, *, tag_column: int = -1) -> list[TaggedSentence]:
    """The sentences of a CoNLL file (CoNLL-2003, WikiANN): one word per line, blank lines between.

    The word is the first whitespace-separated column, the tag column ``tag_column``
    (default: the last, the NER tag in CoNLL-2003's ``word POS chunk NER``). Every word
    line must have as many columns as the first. ``-DOCSTART-`` lines are skipped.

    Raises:
        ValueError: ``tag_column`` is 0 or not an int, a malformed line (naming the file
            and line), or no sentence at all.
    """
    if isinstance(tag_column, bool) or not isinstance(tag_column, int) or tag_column == 0:
        raise ValueError(
            f"tag_column must be a non-zero int (column 0 holds the word), got {tag_column!r}"
        )
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    columns: int | None = None
    for number, line in enumerate(read_lines(path), start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append(TaggedSentence(tuple(words), tuple(tags)))
                words, tags = [], []
            continue
        if columns is None:
            if len(fields) < 2:
                raise line_error(path, number, "expected a word and a tag, got one column")
            if not -len(fields) <= tag_column < len(fields):
                raise line_error(
                    path, number, f"no tag column {tag_column}: the line has {len(fields)} columns"
                )
            columns = len(fields)
        elif len(fields) != columns:
            raise line_error(
                path,
                number,
                f"expected {columns} columns as on the first word line, got {len(fields)}",
            )
        words.append(fields[0])
        tags.append(fields[tag_column])
    if words:
        sentences.append(TaggedSentence(tuple(words), tuple(tags)))
    if not sentences:
        raise ValueError(f"{path}: holds no sentence")
    return sentences


def tagged_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    tags: str,
    words: str = "tokens",
    tag_names: Sequence[str] | None = None,
) -> list[TaggedSentence]:
    """Tagged sentences from records such as the rows of a ``datasets.Dataset``.

    For example Universal Dependencies (``tags="upos"``) or WikiANN (``tags="ner_tags"``)
    from the Hugging Face hub, whose tags are class indices: pass their names, e.g.
    ``tag_names=dataset.features["ner_tags"].feature.names``.

    Args:
        records: mappings with a list of words under ``words`` and of tags under ``tags``.
        tags: the tags' key.
        words: the words' key.
        tag_names: the name of each tag index, needed when the tags are ints.

    Raises:
        ValueError: a record without the keys, with int tags but no (or too few)
            ``tag_names``, or not one tag per word (naming the record).
    """
    sentences = []
    for index, record in enumerate(records):
        if words not in record or tags not in record:
            raise ValueError(
                f"record {index} has keys {sorted(record)}, not {words!r} and {tags!r}"
            )
        values = list(record[tags])
        if any(isinstance(value, int) for value in values):
            if tag_names is None:
                raise ValueError(f"record {index} has int tags: pass their names as tag_names")
            if not all(isinstance(value, int) and 0 <= value < len(tag_names) for value in values):
                raise ValueError(
                    f"record {index}: tags {values} are not all indices into "
                    f"{len(tag_names)} tag_names"
                )
            values = [tag_names[value] for value in values]
        try:
            sentences.append(TaggedSentence(tuple(record[words]), tuple(values)))
        except ValueError as error:
            raise ValueError(f"record {index}: {error}") from None
    return sentences


def tag_vocabulary(sentences: Iterable[TaggedSentence]) -> dict[str, int]:
    """Every tag that occurs, sorted, mapped to its index (for UD, prefer :data:`UPOS_TAGS`)."""
    found = sorted({tag for sentence in sentences for tag in sentence.tags})
    return {tag: index for index, tag in enumerate(found)}

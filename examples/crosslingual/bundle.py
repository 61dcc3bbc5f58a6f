"""The data of one experiment: labelled sentences, memory text and translation pairs.

:func:`synthetic` draws them from the synthetic languages; :func:`from_files` reads real
ones (CoNLL-U, one-sentence-per-line text, two aligned files with optional ``i-j`` word
alignments) with :mod:`gradsurgery.data`'s loaders.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from examples.crosslingual.languages import (
    TAGS,
    Tree,
    make_languages,
    parallel,
    sentences,
    tagged,
)
from gradsurgery.data import SentencePair, TaggedSentence, read_conllu, read_parallel, read_text

T = TypeVar("T")


@dataclass(frozen=True)
class Bundle:
    """Everything fine-tuning and evaluation read.

    Attributes:
        train: labelled sentences per language; the first language is the source (the only
            one the single-source methods see), the others are the extra sources of the
            multi-source rows (LF-MLF and its uniform baseline).
        test: labelled sentences per language, the source's included.
        memory: memory text for the masked-LM objective (source language).
        memory_eval: held-out text per language, for MLM loss before and after.
        pairs: translation pairs (source → each target) for the XSR and alignment objectives.
        pairs_eval: held-out pairs per target language, for XSR P@1.
        tags: the tag set.
    """

    train: dict[str, list[TaggedSentence]]
    test: dict[str, list[TaggedSentence]]
    memory: list[str]
    memory_eval: dict[str, list[str]]
    pairs: list[SentencePair]
    pairs_eval: dict[str, list[SentencePair]]
    tags: tuple[str, ...]

    @property
    def source(self) -> str:
        return next(iter(self.train))


def synthetic(sizes: dict[str, int], seed: int = 7) -> Bundle:
    """Data from languages ``a`` (source), ``b``, ``c`` and ``d``; ``b`` is the second source.

    ``sizes``: ``train``, ``test``, ``memory``, ``eval`` (memory text and pairs per
    language) and ``pairs`` (memory pairs per target) sentences. Fine-tuning data are drawn
    from seeds the pre-training corpus did not use.
    """
    languages = make_languages()
    by_name = {language.name: language for language in languages}
    source, targets = languages[0], languages[1:]

    def draw(count: int, offset: int) -> list[Tree]:
        return sentences(count, seed=seed * 100 + offset)

    train_trees = draw(sizes["train"], 1)
    test_trees = draw(sizes["test"], 2)
    eval_trees = draw(sizes["eval"], 3)
    return Bundle(
        train={name: tagged(train_trees, by_name[name]) for name in ("a", "b")},
        test={lang.name: tagged(test_trees, lang) for lang in languages},
        memory=[" ".join(s.words) for s in tagged(draw(sizes["memory"], 4), source)],
        memory_eval={
            lang.name: [" ".join(s.words) for s in tagged(eval_trees, lang)] for lang in languages
        },
        pairs=[
            pair
            for index, lang in enumerate(targets)
            for pair in parallel(draw(sizes["pairs"], 5 + index), source, lang)
        ],
        pairs_eval={lang.name: parallel(eval_trees, source, lang) for lang in targets},
        tags=TAGS,
    )


def _named(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{what} must be given as LANG=PATH, got {value!r}")
        out[name] = path
    return out


def from_files(
    train: list[str],
    test: list[str],
    memory: str,
    parallel_files: list[str],
    *,
    held_out: float = 0.1,
    seed: int = 0,
) -> Bundle:
    """Real data: ``LANG=FILE.conllu`` for ``train`` (source first) and ``test``,
    ``memory`` a text file (source language, one sentence per line), and
    ``LANG=SOURCE_FILE,TARGET_FILE[,ALIGNMENT_FILE]`` per target language for
    ``parallel_files``. A random ``held_out`` share of the memory text and of each
    language's pairs is kept for evaluation (Liu et al., 2021, hold out 10 %).
    """
    rng = random.Random(seed)

    def split(items: list[T]) -> tuple[list[T], list[T]]:
        rng.shuffle(items)
        cut = max(1, round(len(items) * held_out))
        return items[cut:], items[:cut]

    train_sets = {name: read_conllu(path) for name, path in _named(train, "--train").items()}
    test_sets = {name: read_conllu(path) for name, path in _named(test, "--test").items()}
    source = next(iter(train_sets), None)
    if source not in test_sets or len(test_sets) < 2:
        raise ValueError(
            f"--test needs the source language ({source}, the first --train) and at least "
            f"one target language, got {sorted(test_sets)}"
        )
    text_train, text_eval = split(list(read_text(memory)))
    pairs: list[SentencePair] = []
    pairs_eval: dict[str, list[SentencePair]] = {}
    for name, files in _named(parallel_files, "--parallel").items():
        paths = [Path(p) for p in files.split(",")]
        if len(paths) not in (2, 3):
            raise ValueError(f"--parallel {name}= needs SOURCE,TARGET[,ALIGNMENT], got {files!r}")
        fitted, held = split(list(read_parallel(*paths)))
        pairs += fitted
        pairs_eval[name] = held
    tags = sorted(
        {tag for s in [*train_sets.values(), *test_sets.values()] for x in s for tag in x.tags}
    )
    return Bundle(
        train=train_sets,
        test=test_sets,
        memory=text_train,
        memory_eval={next(iter(train_sets)): text_eval},
        pairs=pairs,
        pairs_eval=pairs_eval,
        tags=tuple(tags),
    )

"""Synthetic languages that share a grammar and lemmas but no words (bar a few anchors).

A small probabilistic grammar generates abstract sentences: trees whose leaves are lemmas
tagged with a part of speech. Every language linearises the same tree with its own word
order (adjective before or after the noun, verb before or after its object, prepositions
or postpositions) and spells each lemma with its own pseudo-word, so the languages share
structure but not vocabulary; numbers and punctuation are anchors spelt alike in all of
them. Some lemmas are both a noun and a verb, and each language spells both readings
alike, so tagging needs the context, not just the word.

A tree linearised in two languages is a translation pair, and its leaves give the word
alignment for free.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gradsurgery.data import SentencePair, TaggedSentence

TAGS = ("DET", "ADJ", "NOUN", "VERB", "ADP", "PRON", "ADV", "CONJ", "NUM", "PUNCT")
ANCHORS = {"NUM": tuple(str(n) for n in range(10)), "PUNCT": (".", "!", "?")}
_LEXICON = {"NOUN": 24, "VERB": 14, "NOUN|VERB": 8, "ADJ": 10, "ADV": 6, "DET": 4}
_LEXICON |= {"PRON": 5, "ADP": 6, "CONJ": 2}


@dataclass(frozen=True)
class Leaf:
    """A word of an abstract sentence: its lemma, its tag, and its position in the tree."""

    lemma: str
    tag: str
    node: int


@dataclass(frozen=True)
class Order:
    """How a language linearises a tree."""

    adjective_after_noun: bool = False
    object_before_verb: bool = False
    postpositions: bool = False


@dataclass(frozen=True)
class Language:
    """A language: a word order and a spelling of every lemma (anchors spell themselves)."""

    name: str
    order: Order
    spelling: dict[str, str]

    def words(self, leaves: list[Leaf]) -> tuple[str, ...]:
        return tuple(self.spelling.get(leaf.lemma, leaf.lemma) for leaf in leaves)


def _lemmas() -> dict[str, list[str]]:
    """Lemma names per tag; a ``NOUN|VERB`` lemma is listed under both."""
    by_tag: dict[str, list[str]] = {tag: [] for tag in TAGS}
    for kind, count in _LEXICON.items():
        for index in range(count):
            for tag in kind.split("|"):
                by_tag[tag].append(f"{kind.lower()}{index}")
    by_tag |= {tag: list(words) for tag, words in ANCHORS.items()}
    return by_tag


LEMMAS = _lemmas()
ORDERS = {
    "a": Order(),
    "b": Order(adjective_after_noun=True, object_before_verb=True, postpositions=True),
    "c": Order(),
    "d": Order(adjective_after_noun=True),
}
"""Language ``a`` is the source; ``b`` differs most from it, ``c`` only in its words."""


def make_languages(names: tuple[str, ...] = ("a", "b", "c", "d"), seed: int = 0) -> list[Language]:
    """The languages, each spelling every lemma with its own pseudo-word (all distinct)."""
    rng = random.Random(seed)
    consonants, vowels = "ptkbdgmnlrsfvz", "aeiou"
    lemmas = sorted(
        {lemma for tag, words in LEMMAS.items() if tag not in ANCHORS for lemma in words}
    )
    used: set[str] = set()
    languages = []
    for name in names:
        spelling = {}
        for lemma in lemmas:
            word = ""
            while not word or word in used:
                syllables = rng.randint(1, 3)
                word = "".join(
                    rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)
                )
            used.add(word)
            spelling[lemma] = word
        languages.append(Language(name, ORDERS[name], spelling))
    return languages


class Tree:
    """One abstract sentence, as nested tuples ``(kind, children)`` with leaves at the bottom."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.nodes = 0
        self.root = self.sentence(depth=0)

    def leaf(self, tag: str) -> Leaf:
        self.nodes += 1
        return Leaf(self.rng.choice(LEMMAS[tag]), tag, self.nodes)

    def sentence(self, depth: int) -> tuple[str, list[object]]:
        parts: list[object] = [self.noun_phrase(depth), self.verb_phrase(depth)]
        if depth == 0 and self.rng.random() < 0.2:
            parts += [self.leaf("CONJ"), self.sentence(depth + 1)]
        if depth == 0:
            parts.append(self.leaf("PUNCT"))
        return ("S", parts)

    def noun_phrase(self, depth: int) -> tuple[str, list[object]]:
        draw = self.rng.random()
        if draw < 0.2:
            return ("NP", [self.leaf("PRON")])
        if draw < 0.32:
            return ("NP", [self.leaf("NUM"), self.leaf("NOUN")])
        adjectives = [self.leaf("ADJ") for _ in range(self.rng.choice((0, 0, 1, 1, 2)))]
        noun = ("N", [*adjectives, self.leaf("NOUN")])
        parts: list[object] = [self.leaf("DET"), noun]
        if depth < 1 and self.rng.random() < 0.25:
            parts.append(("PP", [self.leaf("ADP"), self.noun_phrase(depth + 1)]))
        return ("NP", parts)

    def verb_phrase(self, depth: int) -> tuple[str, list[object]]:
        parts: list[object] = [self.leaf("VERB")]
        if self.rng.random() < 0.7:
            parts.append(self.noun_phrase(depth + 1))
        if self.rng.random() < 0.3:
            parts.append(self.leaf("ADV"))
        return ("VP", parts)


def _linearise(node: object, order: Order) -> list[Leaf]:
    if isinstance(node, Leaf):
        return [node]
    assert isinstance(node, tuple)
    kind, children = node
    children = list(children)
    if kind == "N" and order.adjective_after_noun:
        children = children[-1:] + children[:-1]
    if kind == "VP" and order.object_before_verb and len(children) > 1:
        children[0], children[1] = children[1], children[0]
    if kind == "PP" and order.postpositions:
        children.reverse()
    return [leaf for child in children for leaf in _linearise(child, order)]


def sentences(count: int, seed: int) -> list[Tree]:
    """``count`` abstract sentences drawn from the grammar."""
    rng = random.Random(seed)
    return [Tree(rng) for _ in range(count)]


def tagged(trees: list[Tree], language: Language) -> list[TaggedSentence]:
    """The trees as tagged sentences of ``language``."""
    out = []
    for tree in trees:
        leaves = _linearise(tree.root, language.order)
        out.append(TaggedSentence(language.words(leaves), tuple(leaf.tag for leaf in leaves)))
    return out


def parallel(trees: list[Tree], source: Language, target: Language) -> list[SentencePair]:
    """The trees as translation pairs, word-aligned through the trees' leaves."""
    out = []
    for tree in trees:
        left = _linearise(tree.root, source.order)
        right = _linearise(tree.root, target.order)
        where = {leaf.node: j for j, leaf in enumerate(right)}
        links = tuple((i, where[leaf.node]) for i, leaf in enumerate(left))
        out.append(SentencePair(source.words(left), target.words(right), links))
    return out

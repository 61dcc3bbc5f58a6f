"""Text files read line by line, with errors that name the file and the line."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SAMPLES", "line_error", "read_lines", "read_text", "sample_file"]

PathLike = str | os.PathLike[str]


def read_lines(path: PathLike) -> list[str]:
    """The lines of a UTF-8 file (a leading byte-order mark and line ends removed).

    Only a line feed (optionally after a carriage return) ends a line, so a word may hold
    any other character, including the separators ``str.splitlines`` would split at.

    Raises:
        ValueError: the file is not UTF-8 text.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def line_error(path: PathLike, number: int, message: str) -> ValueError:
    """A ``ValueError`` about line ``number`` (1-based) of ``path``."""
    return ValueError(f"{path}, line {number}: {message}")


def read_text(path: PathLike) -> list[str]:
    """The non-blank lines of a text file, stripped: memory text, one sentence per line.

    Raises:
        ValueError: the file is not UTF-8 text, or holds no sentence.
    """
    sentences = [line.strip() for line in read_lines(path) if line.strip()]
    if not sentences:
        raise ValueError(f"{path}: holds no sentence")
    return sentences


SAMPLES = (
    "en_ner.conll",
    "en_pos.conllu",
    "memory.en",
    "parallel.de",
    "parallel.en",
    "parallel.en-de.align",
)
"""The tiny sample files shipped in ``gradsurgery/data/samples`` (one example per format)."""


def sample_file(name: str) -> Path:
    """The path of a shipped sample file (see :data:`SAMPLES`), e.g. ``"en_pos.conllu"``.

    Raises:
        ValueError: an unknown name.
    """
    if name not in SAMPLES:
        raise ValueError(f"no sample file {name!r}: the samples are {', '.join(SAMPLES)}")
    return Path(__file__).with_name("samples") / name

"""``cite``: the BibTeX to cite for what you ran, the library and the method's papers.

>>> from gradsurgery import cite
>>> print(cite("PCGrad"))  # doctest: +ELLIPSIS
@software{gradsurgery,
...
@inproceedings{yu-etal-2020-pcgrad,
  title     = {Gradient Surgery for Multi-Task Learning},
...

Given an optimizer, ``cite`` walks the whole stack of wrappers, so
``cite(PhasedLR(GEMProjector(AdamW(...)), model))`` cites GEM's papers and Guo et al.
"""

from __future__ import annotations

from torch.optim import Optimizer

from gradsurgery import wrappers
from gradsurgery._version import __version__
from gradsurgery.papers import Paper

__all__ = ["LIBRARY_BIBTEX", "cite", "methods"]

LIBRARY_BIBTEX = f"""@software{{gradsurgery,
  title   = {{gradsurgery: torch.optim wrappers that do gradient surgery against forgetting}},
  author  = {{{{gradsurgery contributors}}}},
  version = {{{__version__}}},
  year    = {{2026}},
  license = {{MIT}},
  url     = {{https://github.com/gradsurgery/gradsurgery}}
}}"""
"""The BibTeX entry of the library itself (its version is the installed one)."""


def methods() -> dict[str, type[wrappers.WrappedOptimizer]]:
    """The wrappers that implement a published method, by class name."""
    return {
        name: cls
        for name in wrappers.__all__
        if isinstance(cls := getattr(wrappers, name), type)
        and issubclass(cls, wrappers.WrappedOptimizer)
        and cls.papers
    }


def _papers_of(method: object) -> tuple[Paper, ...]:
    if isinstance(method, str):
        by_name = {name.lower(): cls for name, cls in methods().items()}
        if method.lower() not in by_name:
            raise ValueError(
                f"unknown method {method!r}; cite one of {sorted(methods())}, a wrapper "
                "class or an optimizer built from them"
            )
        return by_name[method.lower()].papers
    if isinstance(method, type) and issubclass(method, wrappers.WrappedOptimizer):
        return method.papers
    if isinstance(method, Optimizer):
        found: list[Paper] = []
        inner: Optimizer = method
        while isinstance(inner, wrappers.WrappedOptimizer):
            found.extend(type(inner).papers)
            inner = inner.optimizer
        return tuple(found)
    raise TypeError(
        f"cite takes a method's name, a wrapper class or an optimizer, got {type(method).__name__}"
    )


def cite(method: object = None) -> str:
    """BibTeX for the library and, if given, the papers of ``method``.

    Args:
        method: a wrapper's name (``"PCGrad"``, any case), a wrapper class, or an
            optimizer: a wrapper instance, whose whole stack of wrappers is cited. ``None``
            cites the library alone.

    Returns:
        The entries, the library's first, separated by blank lines, each paper once.

    Raises:
        ValueError: an unknown method name.
        TypeError: anything else that is not a method, a wrapper class or an optimizer.
    """
    papers = () if method is None else _papers_of(method)
    unique = {paper.key: paper.bibtex for paper in papers}
    return "\n\n".join([LIBRARY_BIBTEX, *unique.values()])

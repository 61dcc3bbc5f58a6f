"""``cite``: the BibTeX to cite for what you ran, the library and the method's papers.

>>> from gradsurgery import cite
>>> print(cite("PCGrad"))  # doctest: +ELLIPSIS
@software{gradsurgery,
...
@inproceedings{yu-etal-2020-pcgrad,
  title     = {Gradient Surgery for Multi-Task Learning},
...

Given an optimizer, ``cite`` walks the whole stack of wrappers, so
``cite(PhasedLR(GEMProjector(AdamW(...)), model))`` cites GEM's papers and Guo et al.; the
functional forms (``cite(gem_project)``), the memory objectives (``cite(MaskedLM)``) and
``CKAMonitor`` are cited by their papers too.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.optim import Optimizer

from gradsurgery import functional, objectives, similarity, wrappers
from gradsurgery._version import __version__
from gradsurgery.papers import EFIMOV_2022, KORNBLITH_2019, LIU_2021, Paper

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


def _other_citables() -> dict[Callable[..., object], tuple[Paper, ...]]:
    """The functional forms and helpers that implement a paper without being a wrapper."""
    return {
        functional.gem_project: wrappers.GEMProjector.papers,
        functional.gem_multipliers: wrappers.GEMProjector.papers,
        functional.lfmlf_weights: wrappers.ParetoLessForgetting.papers,
        functional.uniform_weights: wrappers.Uniform.papers,
        functional.pcgrad_weights: wrappers.PCGrad.papers,
        functional.gradvac_weights: wrappers.GradVac.papers,
        functional.mgda_weights: wrappers.MGDA.papers,
        similarity.linear_cka: (KORNBLITH_2019,),
        similarity.CKAMonitor: (KORNBLITH_2019,),
        objectives.MaskedLM: (LIU_2021,),
        objectives.mlm_loss: (LIU_2021,),
        objectives.SentenceRetrieval: (LIU_2021,),
        objectives.xsr_loss: (LIU_2021,),
        objectives.CrossLingualAlignment: (EFIMOV_2022,),
        objectives.alignment_loss: (EFIMOV_2022,),
    }


def _papers_of(method: object) -> tuple[Paper, ...]:
    others = _other_citables()
    if isinstance(method, str):
        by_name = {name.lower(): cls.papers for name, cls in methods().items()}
        by_name.update({obj.__name__.lower(): found for obj, found in others.items()})
        if method.lower() not in by_name:
            raise ValueError(
                f"unknown method {method!r}; cite one of {sorted(methods())}, a functional "
                "form such as 'gem_project', a wrapper class or an optimizer built from them"
            )
        return by_name[method.lower()]
    if isinstance(method, type) and issubclass(method, wrappers.WrappedOptimizer):
        return method.papers
    instance_of = [cls for cls in others if isinstance(cls, type) and isinstance(method, cls)]
    if instance_of:
        return others[instance_of[0]]
    if callable(method) and method in others:
        return others[method]
    if isinstance(method, Optimizer):
        found: list[Paper] = []
        inner: Optimizer = method
        while isinstance(inner, wrappers.WrappedOptimizer):
            found.extend(type(inner).papers)
            inner = inner.optimizer
        return tuple(found)
    raise TypeError(
        "cite takes a method's name, a wrapper class, an optimizer, a functional form or "
        f"CKAMonitor, got {type(method).__name__}"
    )


def cite(method: object = None) -> str:
    """BibTeX for the library and, if given, the papers of ``method``.

    Args:
        method: a wrapper's name (``"PCGrad"``, any case), a wrapper class, an optimizer
            (a wrapper instance, whose whole stack of wrappers is cited), a functional
            form (``gem_project`` or its name), a memory objective (class, instance or loss
            function) or ``CKAMonitor``. ``None`` cites the
            library alone.

    Returns:
        The entries, the library's first, separated by blank lines, each paper once.

    Raises:
        ValueError: an unknown method name.
        TypeError: anything else.
    """
    papers = () if method is None else _papers_of(method)
    unique = {paper.key: paper.bibtex for paper in papers}
    return "\n\n".join([LIBRARY_BIBTEX, *unique.values()])

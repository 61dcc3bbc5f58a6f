"""What a user cites: CITATION.cff, each wrapper's BibTeX and ``gradsurgery.cite``."""

import re
from pathlib import Path

import pytest
import torch
import yaml

import gradsurgery
from gradsurgery import GEMProjector, PCGrad, PhasedLR, cite, papers
from gradsurgery.citation import LIBRARY_BIBTEX, methods
from tests.encoders import bert

ROOT = Path(__file__).resolve().parent.parent


def bibtex_entries(text: str) -> list[dict[str, str]]:
    """A minimal BibTeX reader: balanced braces, one ``@type{key,`` per entry, fields."""
    assert text.count("{") == text.count("}"), text
    entries = []
    for chunk in re.split(r"\n(?=@)", text.strip()):
        head = re.match(r"@(\w+)\{([^,\s]+),\n", chunk)
        assert head is not None, chunk
        depth = 0
        for char in chunk:
            depth += {"{": 1, "}": -1}.get(char, 0)
            assert depth >= 0, chunk
        assert depth == 0 and chunk.rstrip().endswith("}"), chunk
        fields = dict(re.findall(r"^\s+(\w+)\s*=\s*\{(.*)\},?$", chunk, re.M))
        entries.append({"type": head.group(1), "key": head.group(2), **fields})
    return entries


def test_citation_cff_parses_and_matches_the_package():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert cff["version"] == gradsurgery.__version__
    license = re.search(r'^license = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert license is not None and cff["license"] == license.group(1)
    assert cff["authors"] == [{"name": "gradsurgery contributors"}]


def test_citation_cff_references_are_the_papers_of_the_library():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    by_title = {
        bibtex_entries(paper.bibtex)[0]["title"]: bibtex_entries(paper.bibtex)[0]
        for paper in papers.PAPERS
    }
    assert len(cff["references"]) == 4
    for reference in cff["references"]:
        entry = by_title[reference["title"]]
        assert str(reference["year"]) == entry["year"]
        families = [author["family-names"] for author in reference["authors"]]
        assert families == [name.split(",")[0] for name in entry["author"].split(" and ")]


@pytest.mark.parametrize("paper", papers.PAPERS, ids=lambda paper: paper.key)
def test_each_paper_is_one_well_formed_entry(paper):
    (entry,) = bibtex_entries(paper.bibtex)
    assert entry["key"] == paper.key
    assert entry["title"] and entry["author"]
    assert re.fullmatch(r"(19|20)\d\d", entry["year"])
    assert entry["year"] in paper.reference


@pytest.mark.parametrize("name", sorted(methods()))
def test_each_wrapper_carries_the_bibtex_of_its_papers(name):
    cls = methods()[name]
    entries = bibtex_entries(cls.bibtex)
    assert [entry["key"] for entry in entries] == [paper.key for paper in cls.papers]
    assert all(entry["title"] and entry["year"] for entry in entries)


def test_every_method_wrapper_names_a_paper():
    assert sorted(methods()) == [
        "GEMProjector",
        "GradVac",
        "MGDA",
        "PCGrad",
        "ParetoLessForgetting",
        "PhasedLR",
        "Uniform",
    ]


def test_cite_by_name_class_or_optimizer_gives_the_library_then_the_papers():
    by_name = cite("pcgrad")
    assert by_name == cite(PCGrad) == cite("PCGrad")
    entries = bibtex_entries(by_name)
    assert [entry["key"] for entry in entries] == ["gradsurgery", papers.YU_2020.key]
    assert entries[0]["version"] == gradsurgery.__version__
    assert cite() == LIBRARY_BIBTEX


def test_cite_walks_a_stack_of_wrappers_and_lists_each_paper_once():
    model = bert(layers=2)
    gem = GEMProjector(torch.optim.SGD(model.parameters(), lr=0.1), margin=0.0)
    keys = [entry["key"] for entry in bibtex_entries(cite(PhasedLR(gem, model)))]
    assert keys == [
        "gradsurgery",
        papers.GUO_2023.key,
        papers.LIU_2021.key,
        papers.LOPEZ_PAZ_2017.key,
        papers.CHAUDHRY_2019.key,
    ]
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert cite(plain) == LIBRARY_BIBTEX


def test_cite_knows_the_functional_forms_and_the_cka_monitor():
    from gradsurgery.functional import gem_project, lfmlf_weights, mgda_weights
    from gradsurgery.similarity import CKAMonitor, linear_cka

    assert cite(gem_project) == cite("gem_project") == cite(GEMProjector)
    assert cite(lfmlf_weights) == cite("ParetoLessForgetting")
    assert cite(mgda_weights) == cite("MGDA")
    keys = [entry["key"] for entry in bibtex_entries(cite(CKAMonitor(window=3)))]
    assert keys == ["gradsurgery", papers.KORNBLITH_2019.key]
    assert cite(linear_cka) == cite(CKAMonitor) == cite("linear_cka")


def test_cite_knows_the_memory_objectives():
    from gradsurgery.objectives import CrossLingualAlignment, MaskedLM, mlm_loss, xsr_loss

    def keys(text):
        return [entry["key"] for entry in bibtex_entries(text)][1:]

    assert keys(cite(MaskedLM)) == keys(cite(MaskedLM())) == [papers.LIU_2021.key]
    assert keys(cite(mlm_loss)) == keys(cite("xsr_loss")) == keys(cite(xsr_loss))
    assert keys(cite(CrossLingualAlignment)) == [papers.EFIMOV_2022.key]


def test_cite_rejects_what_it_cannot_cite():
    with pytest.raises(ValueError, match="unknown method 'adam'; cite one of"):
        cite("adam")
    with pytest.raises(TypeError, match="got int"):
        cite(3)
    with pytest.raises(TypeError, match="got function"):
        cite(lambda: None)

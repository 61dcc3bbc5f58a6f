"""The documentation: the site builds with warnings as errors, and its examples run.

Code blocks in the Markdown pages (README.md and docs/*.md): a block fenced as
```` ```python ```` is executed, the blocks of a page in order in one namespace, from the
repository root; a block that cannot run on its own (it needs a model, data or a loop
around it) is fenced as ```` ```python no-run ```` and only shown. Docstring examples
(``>>>``) run as doctests.
"""

import ast
import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import gradsurgery
from gradsurgery import errors, papers
from gradsurgery.citation import LIBRARY_BIBTEX

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```(python[^\n]*)\n(.*?)^```", re.S | re.M)
RUN, NO_RUN = "python", "python no-run"


def python_blocks(page: Path) -> list[tuple[str, str]]:
    return FENCE.findall(page.read_text())


def runnable(page: Path) -> list[str]:
    return [code for info, code in python_blocks(page) if info == RUN]


def test_docs_build_with_warnings_as_errors(tmp_path, capsys):
    from sphinx.cmd.build import build_main

    status = build_main(["-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path)])
    assert status == 0, capsys.readouterr().err
    api = (tmp_path / "api.html").read_text()
    for name in gradsurgery.citation.methods():
        assert f'id="gradsurgery.{name}"' in api, name
    assert "Getting started" in (tmp_path / "index.html").read_text()


def test_python_fences_say_whether_they_run():
    for page in PAGES:
        for info, _ in python_blocks(page):
            assert info in (RUN, NO_RUN), f"{page.name}: fence info {info!r}"


def test_the_newcomer_pages_have_examples_that_run():
    pages = {page.name for page in PAGES if runnable(page)}
    assert {"README.md", "getting_started.md", "faq.md", "citing.md"} <= pages


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=lambda p: p.name)
def test_python_blocks_of_the_page_run(page, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for index, code in enumerate(runnable(page)):
        exec(compile(code, f"{page.name}[python block {index}]", "exec"), namespace)
    assert capsys.readouterr().err == ""


def test_docstring_examples_run():
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    finder = doctest.DocTestFinder()
    modules = [gradsurgery] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(gradsurgery.__path__, "gradsurgery.")
    ]
    for module in modules:
        for test in finder.find(module):
            runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0
    assert results.attempted >= 5


def test_every_bibtex_entry_in_the_docs_is_the_one_in_the_code():
    known = {paper.bibtex for paper in papers.PAPERS} | {LIBRARY_BIBTEX}
    seen = set()
    for page in PAGES:
        for block in re.findall(r"^```bibtex\n(.*?)^```", page.read_text(), re.S | re.M):
            for entry in re.split(r"\n(?=@)", block.strip()):
                assert entry in known, f"{page.name}: {entry.splitlines()[0]}"
                seen.add(entry)
    assert seen == known  # citing.md shows every one


def _runtime_error_messages() -> list[str]:
    """The longest literal piece of each ``raise RuntimeError(...)`` message in the package."""
    pieces = []
    for path in sorted((ROOT / "gradsurgery").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and getattr(node.exc.func, "id", None) == "RuntimeError"
            ):
                literals = [
                    c.value
                    for c in ast.walk(node.exc.args[0])
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                ]
                pieces.append(max(literals, key=len).replace("`", "").strip(" :;.")[:30])
    return pieces


def test_the_faq_explains_every_error():
    faq = " ".join((DOCS / "faq.md").read_text().replace("`", "").split())
    for name in errors.__all__:
        assert name in faq, name
    messages = _runtime_error_messages()
    assert len(messages) >= 8
    for piece in messages:
        assert " ".join(piece.split()) in faq, piece


# Files users do not have: the maintainers' reference notes and their numbered papers.
FOREIGN = re.compile("|".join([r"\bS" + r"PEC\b", "\u00a7", r"\bseeds? 0\d\d"]), re.I)
OWN_TEXT = ("*.py", "*.md", "*.toml", "*.cff", "*.cfg", "*.txt", "*.json", "*.yaml", "*.yml")


def test_nothing_cites_a_file_users_do_not_have():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in ("gradsurgery", "tests", "docs", "examples", "bench")
        for pattern in OWN_TEXT
        for path in sorted((ROOT / folder).rglob(pattern))
        if "_build" not in path.parts
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if FOREIGN.search(line)
    ]
    found += [f"README.md: {m.group()}" for m in FOREIGN.finditer((ROOT / "README.md").read_text())]
    assert not found, "cite the papers and docs/*.md instead:\n" + "\n".join(found)


def test_every_design_decision_names_a_test_that_exists():
    text = (DOCS / "design.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    decisions = [row for row in rows if not row.startswith("| decision |")]
    assert len(decisions) >= 20
    for row in decisions:
        module = None
        named = re.findall(r"`(tests/\w+\.py)?(?:::(\w+))?`", row)
        assert named, f"a decision without its test: {row}"
        for path, name in named:
            module = path or module
            assert module is not None and (ROOT / module).is_file(), row
            if name:
                assert f"def {name}(" in (ROOT / module).read_text(), f"{module}::{name}"

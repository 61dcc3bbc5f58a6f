"""The README's two commands: CI runs the test one, and the demo one works."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(
        r"## Set up and run.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S
    )
    assert block is not None
    return [line.split("#")[0].strip() for line in block.group(1).strip().splitlines()]


def test_ci_runs_exactly_the_readme_test_command():
    _, tests = readme_commands()
    assert tests.endswith("python -m pytest")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines
    assert ci_lines[-1] == tests


def test_the_demo_command_runs_and_reports():
    demo, _ = readme_commands()
    script = demo.split("&&")[-1].split()[1:]
    result = subprocess.run(
        [sys.executable, *script, "--steps", "60"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "the gradient was projected in" in result.stdout
    headers = [line for line in result.stdout.splitlines() if line.startswith("== ")]
    assert len(headers) == 3 and all(line.endswith(")") for line in headers)  # not cut off
    assert result.stdout.count("<x, g_a>") >= 2  # each GEM run names its step columns
    assert "A-GEM constrains only the average memory gradient" in result.stdout
    rows = {
        line[:20].strip(): [float(x) for x in line[20:].split()]
        for line in result.stdout.splitlines()
        if line[:20].strip() in ("plain fine-tuning", "GEM", "A-GEM")
    }
    # columns: new-task loss, then (loss, change) per memory task
    for run in ("GEM", "A-GEM"):
        assert rows[run][2] < rows["plain fine-tuning"][2]
        assert rows[run][4] < rows["plain fine-tuning"][4]


def test_the_readme_example_is_at_most_ten_lines():
    """It runs too: tests/test_docs.py executes every ```python block of the README."""
    example = re.search(r"## Example.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert example is not None
    lines = [line for line in example.group(1).splitlines() if line.strip()]
    assert 5 <= len(lines) <= 10


def test_the_slow_marker_says_what_pytest_does():
    """Slow tests run by default (CI runs them); the marker's text says so."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    (addopts,) = re.findall(r'^addopts = "(.*)"$', pyproject, re.M)
    assert "-m" not in addopts.split()
    (slow,) = re.findall(r'^\s*"slow: (.*)",$', pyproject, re.M)
    assert "runs by default" in slow and "-m 'not slow'" in slow
    assert 'python -m pytest -m "not slow"' in (ROOT / "docs" / "getting_started.md").read_text()


def test_the_cpu_install_is_next_to_the_two_commands():
    """Regression (issue 14): a bare install pulls the multi-GB CUDA build on a CPU machine."""
    cpu = "python -m pip install torch --index-url https://download.pytorch.org/whl/cpu"
    setup = re.search(r"## Set up and run(.*?)\n## ", (ROOT / "README.md").read_text(), re.S)
    started = (ROOT / "docs" / "getting_started.md").read_text()
    install = re.search(r"## Install(.*?)\n## ", started, re.S)
    assert setup is not None and install is not None
    assert cpu in setup.group(1) and cpu in install.group(1)

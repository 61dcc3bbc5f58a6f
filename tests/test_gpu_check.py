"""``bench/gpu_check.sh`` runs end to end on the CPU with ``--dry-run`` and refuses bad input.

The real check needs a CUDA device; the dry run takes the same steps (CUDA tests, one
benchmark run per size and dtype, the merged report) at a tiny size on the CPU.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the script is bash")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.mark.slow  # 20-35 s on a 2-core machine: six Python start-ups and a plot
def test_the_dry_run_writes_the_tests_log_and_the_merged_report(tmp_path: Path):
    out = tmp_path / "results" / "check"
    done = run("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr
    log = Path(f"{out}_tests.txt").read_text()
    assert "device: dry-run" in log and "torch" in log
    assert re.search(r"\b[1-9]\d* skipped", log) or " passed" in log  # the CUDA tests ran
    doc = json.loads(out.with_suffix(".json").read_text())
    assert len(doc["runs"]) == 2  # one run per dtype, merged
    assert {(r["dtype"], r["t"]) for r in doc["results"]} == {
        ("fp32", 1),
        ("fp32", 2),
        ("bf16", 1),
        ("bf16", 2),
    }
    for result in doc["results"]:
        assert result["methods"]["gem"]["ratio_to_floor"] > 0
        assert "published GEM" in result["peers"]
    assert "| 2e4 | bf16 | 2 | gem |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


def test_an_unknown_argument_is_refused():
    done = run("--fast")
    assert done.returncode == 2
    assert "unknown argument --fast (allowed: --dry-run, --out PATH)" in done.stderr


def test_without_a_cuda_device_the_real_check_refuses_at_once(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the real check would run")
    done = run("--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert "no CUDA device is visible to torch" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing written

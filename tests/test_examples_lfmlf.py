"""The LF-MLF toy example runs, saves its picture, and shows what it claims."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_toy_example_runs_and_lfmlf_stays_closer_to_the_start(tmp_path: Path):
    out = tmp_path / "toy.png"
    result = subprocess.run(
        [sys.executable, "examples/lfmlf_toy.py", "--steps", "100", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # columns: method, final θ, ‖θ_K − θ_p‖, max ‖θ_k − θ_p‖, path, to Pareto set, gap, skipped
    rows = {
        cells[0]: [float(x) for x in cells[2:]]
        for cells in (line.split() for line in result.stdout.splitlines())
        if len(cells) == 8 and cells[1].startswith("(")
    }
    assert set(rows) == {"Uniform", "LF-MLF", "PCGrad", "MGDA"}
    assert rows["LF-MLF"][0] < 0.8 * rows["Uniform"][0]
    for method in ("Uniform", "LF-MLF"):
        assert rows[method][4] < 1e-3  # both reach the Pareto set
    assert rows["LF-MLF"][5] > 0  # and LF-MLF then detects stationarity and skips
    identity = re.search(r"ḡ equals \(θ_p − θ_K\)/η to (\S+) relative", result.stdout)
    assert identity is not None and float(identity.group(1)) < 1e-12

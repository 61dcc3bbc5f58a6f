"""examples/phased_lr.py runs, prints multipliers as in Guo et al. (2023), and saves its plot."""

import runpy
import sys
from pathlib import Path

import pytest

from tests.encoders import one_thread

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "phased_lr.py"


def test_the_example_prints_what_phased_lr_did(tmp_path, capsys, monkeypatch):
    plot = tmp_path / "phased_lr.png"
    arguments = ["--steps", "40", "--window", "8", "--every", "1", "--pretrain-steps", "10"]
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), *arguments, "--plot", str(plot)])
    with one_thread():
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out

    assert "S_I    0–9     all" in out and "  V_II 10–11   attention (attention)" in out
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [int(row[0]) for row in rows] == list(range(1, 41))
    for step, _, phase, ratio, adaptive, k_s1, k_s2, k_v1, k_v2, _, c2 in rows:
        if int(step) < 16:  # before 2W observations
            assert (phase, ratio, adaptive) == ("P1", "-", "-")
        if phase == "P1":
            assert [float(k) for k in (k_s1, k_s2, k_v1, k_v2)] == [0.01, 0.01, 1, 1]
            assert c2 == "no"
        else:
            assert float(adaptive) == pytest.approx(max(1 - float(ratio) ** 3, 0), abs=3e-3)
            assert (float(k_s1), float(k_v1)) == (1, 1)
            assert float(k_s2) == pytest.approx(float(adaptive), abs=6e-4)
            assert float(k_v2) == (10 if c2 == "yes" else 1)
    p2 = sum(row[2] == "P2" for row in rows)
    assert p2 > 0 and f"P2 in {p2} of 40 steps" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

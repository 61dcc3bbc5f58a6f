"""The benchmark's re-implemented peers agree with the library; the QP study runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from gradsurgery.bench.libmtl import mgda_frank_wolfe, pcgrad_loop
from gradsurgery.bench.workload import objective_rows
from gradsurgery.functional import mgda_weights, pcgrad_weights
from gradsurgery.functional.pcgrad import conflict_orders

ROOT = Path(__file__).resolve().parent.parent


def run_module(module: str, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
        check=True,
    )


def test_lfmlf_qp_runs(tmp_path: Path):
    out = tmp_path / "qp"
    run_module("bench.lfmlf_qp", "--objectives", "2", "3", "--count", "3", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())
    assert len(rows) == 4 * 3 * 2 * 2  # solvers × variants × T × kinds


def test_libmtl_style_pcgrad_is_pcgrad_with_the_same_orders():
    grads = torch.empty(4, 1000, dtype=torch.float64)
    objective_rows(grads)
    orders = conflict_orders(4, torch.Generator().manual_seed(3))
    out = torch.empty(1000, dtype=torch.float64)
    pcgrad_loop(grads, orders, out)
    weights = pcgrad_weights(grads, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, grads.T @ weights)


def test_sener_koltun_frank_wolfe_approaches_the_min_norm_point():
    grads = torch.empty(5, 1000, dtype=torch.float64)
    objective_rows(grads)
    out = torch.empty(1000, dtype=torch.float64)
    iterations = mgda_frank_wolfe(grads, out)
    exact = grads.T @ mgda_weights(grads)
    assert 0 < iterations <= 250
    assert float((out - exact).norm() / exact.norm()) < 1e-3
    assert float(out.norm()) >= float(exact.norm()) * (1 - np.finfo(np.float64).eps)

"""Accuracy and time of each solver of the GEM dual, on random and on degenerate problems.

For ``t`` constraints it draws problems (``p = 64``, row scales spread over 1e-6…1e3,
the task gradient against the constraints) of two kinds: *generic* (``t ≤ p`` random rows)
and *degenerate* (duplicated rows, a zero row, or ``t > p``: a singular Gram matrix). Each
solver's projection ``x = g + Jᵀv`` is compared with SciPy's NNLS on the full matrix
(independent, float64); the error is relative to ``‖g‖ + Σ|v_k|‖g_k‖``, the size of the
terms of ``x``. Time is the median wall time of :func:`gradsurgery.qp.solve_lower_bounded`
on the CPU, including the rescaling and, for qpsolvers backends, the polishing step.

    python bench/qp_solvers.py --out bench/results/qp_solvers
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from gradsurgery import qp
from gradsurgery.bench import report

SOLVERS = ["enumerate", "daqp", "quadprog", "osqp", "clarabel"]


def problem(rng: np.random.Generator, t: int, degenerate: bool) -> tuple[np.ndarray, np.ndarray]:
    p = 64 if not degenerate or t < 4 else max(2, t // 2)
    J = rng.standard_normal((t, p)) * 10.0 ** rng.uniform(-6, 3, (t, 1))
    if degenerate and t >= 2:
        J[-1] = J[0] * 3.0
        if t >= 3:
            J[-2] = 0.0
    g = rng.standard_normal(p) - (J / np.linalg.norm(J, axis=1, keepdims=True).clip(1e-300)).sum(0)
    return g, J


def reference(g: np.ndarray, J: np.ndarray) -> np.ndarray:
    u, _ = nnls(J.T, -g, maxiter=100 * len(J))
    projected: np.ndarray = g + J.T @ u
    return projected


def measure(solver: str, t: int, degenerate: bool, count: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    errors, times, failures = [], [], 0
    for _ in range(count):
        g, J = problem(rng, t, degenerate)
        K, b = torch.tensor(J @ J.T), torch.tensor(J @ g)
        lower = torch.zeros(t, dtype=torch.float64)
        start = time.perf_counter()
        try:
            v = qp.solve_lower_bounded(K, b, lower, solver).v.numpy()
        except Exception:  # a backend refusing a singular K is a result, not a crash
            failures += 1
            continue
        times.append(time.perf_counter() - start)
        scale = np.linalg.norm(g) + float(np.sum(np.abs(v) * np.linalg.norm(J, axis=1)))
        errors.append(float(np.linalg.norm(g + J.T @ v - reference(g, J)) / scale))
    return {
        "solver": solver,
        "t": t,
        "degenerate": degenerate,
        "max_error": max(errors) if errors else None,
        "median_time_s": statistics.median(times) if times else None,
        "failures": failures,
        "count": count,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| solver | t | generic: max error | degenerate: max error | time (median) | failures |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for generic, degenerate in zip(rows[::2], rows[1::2], strict=True):

        def error(r: dict[str, Any]) -> str:
            return "—" if r["max_error"] is None else f"{r['max_error']:.0e}"

        failed = generic["failures"] + degenerate["failures"]
        total = generic["count"] + degenerate["count"]
        time_cell = (
            "—" if generic["median_time_s"] is None else f"{1e6 * generic['median_time_s']:.0f} µs"
        )
        lines.append(
            f"| {generic['solver']} | {generic['t']} | {error(generic)} | {error(degenerate)} | "
            f"{time_cell} | {failed}/{total} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--constraints", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for solver in SOLVERS:
        for t in args.constraints:
            if solver == "enumerate" and t > 12:
                continue
            for degenerate in (False, True):
                rows.append(measure(solver, t, degenerate, args.count, seed=t))
    report.write(rows, markdown(rows), args.out)


if __name__ == "__main__":
    main()

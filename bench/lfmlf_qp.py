"""Accuracy and time of each backend on LF-MLF's Problem 2, with and without the polishing.

For ``T`` objectives it draws problems ``min ½wᵀKw + cᵀw`` s.t. ``Kw ≥ 0``, ``Σw = 1``,
``w ≥ 0`` with ``K = JJᵀ``, ``c = Jḡ``, of two kinds: *random* (``T`` rows of ``p = 64``
values, row norms spread over 1e-3…1e3, ``ḡ`` of norm 1e-3…1e3) and *degenerate* (the
same with the last gradient a rescaled copy of the first, and ``T > p``: ``p = ⌈T/2⌉ − 1``,
at least 1, so ``K`` is singular and a Pareto-stationary problem, whose feasible set
shrinks to the min-norm face, is common). Each backend (DAQP, OSQP, quadprog, Clarabel)
solves them three ways:

* ``gradsurgery``: :func:`gradsurgery.simplex_qp.lfmlf_qp` (scaled by ``max diag K``, the
  library's tolerances, finished by its active-set method, certified);
* ``tight``: :func:`gradsurgery.qp.backend_solve` (the library's tolerances, no scaling,
  no finish) on the problem as it comes (DAQP and quadprog take no options: as ``raw``);
* ``raw``: ``qpsolvers.solve_qp`` with the same constraints at the backend's defaults.

Three figures per solution:

* *error*: the distance between the directions ``d = Jᵀw``, ``sqrt(Δwᵀ K Δw)``, relative
  to ``sqrt(trace K)``, against brute force over active sets (``tests/reference.py``,
  independent of the library's solvers) for ``T ≤ 5``; at ``T = 10`` (``2²⁰`` active
  sets) the KKT certificate :func:`gradsurgery.simplex_qp.lfmlf_kkt_residual` instead. A
  problem on which brute force finds no KKT point is left out of it and counted;
* *ascent*: ``max_t (−⟨d, g_t⟩)₊ / (‖g_t‖ · sqrt(trace K))``, how far ``d`` breaks the
  constraint ``⟨d, g_t⟩ ≥ 0`` measured on each objective's own scale (``Kw ≥ −1e-6·‖K‖``
  allows a large breach for a gradient much smaller than the others); needs no reference;
* *time*: the median wall time of the call on the CPU.

A failure is an exception or no answer.

    python -m bench.lfmlf_qp --out bench/results/lfmlf_qp
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import qpsolvers
import torch

from gradsurgery import qp, simplex_qp
from gradsurgery.bench import report
from tests import reference

SOLVERS = ["daqp", "osqp", "quadprog", "clarabel"]
MAX_BRUTE_FORCE = 5  # 4^T least-squares systems per problem
Problem = tuple[np.ndarray, np.ndarray]


def problem(rng: np.random.Generator, t: int, degenerate: bool) -> Problem:
    """``(K, c)`` of one LF-MLF step (see the module docstring)."""
    p = max(1, -(-t // 2) - 1) if degenerate else 64
    J = rng.standard_normal((t, p)) * 10.0 ** rng.uniform(-3, 3, (t, 1))
    if degenerate:
        J[-1] = J[0] * 10.0 ** rng.uniform(-1, 1)
    accumulated = rng.standard_normal(p) * 10.0 ** rng.uniform(-3, 3)
    return J @ J.T, J @ accumulated


def _constraints(K: np.ndarray) -> dict[str, np.ndarray]:
    t = len(K)
    return {"G": -K, "h": np.zeros(t), "A": np.ones((1, t)), "b": np.ones(1), "lb": np.zeros(t)}


def gradsurgery_solve(K: np.ndarray, c: np.ndarray, solver: str) -> np.ndarray:
    return simplex_qp.lfmlf_qp(torch.tensor(K), torch.tensor(c), solver).w.numpy()


def tight_solve(K: np.ndarray, c: np.ndarray, solver: str) -> np.ndarray:
    return qp.backend_solve(solver, K, c, **_constraints(K))


def raw_solve(K: np.ndarray, c: np.ndarray, solver: str) -> np.ndarray:
    bounds = _constraints(K)
    x = qpsolvers.solve_qp(
        K, c, bounds["G"], bounds["h"], bounds["A"], bounds["b"], bounds["lb"], solver=solver
    )
    if x is None:
        raise RuntimeError(f"{solver} returned no solution")
    return np.asarray(x, dtype=np.float64)


VARIANTS: dict[str, Callable[[np.ndarray, np.ndarray, str], np.ndarray]] = {
    "raw": raw_solve,
    "tight": tight_solve,
    "gradsurgery": gradsurgery_solve,
}


def brute_force(K: np.ndarray, c: np.ndarray) -> np.ndarray | None:
    """The exact solution, or None where brute force finds no KKT point."""
    try:
        return reference.lfmlf(K, c)
    except AssertionError:
        return None


def accuracy(K: np.ndarray, c: np.ndarray, w: np.ndarray, exact: np.ndarray | None) -> float:
    """Direction distance to ``exact`` relative to ``sqrt(trace K)``; or the KKT residual."""
    if exact is None:
        residual = simplex_qp.lfmlf_kkt_residual(torch.tensor(K), torch.tensor(c), torch.tensor(w))
        return float(residual)
    dw = w - exact
    return float(np.sqrt(max(dw @ K @ dw, 0.0) / np.trace(K)))


def ascent(K: np.ndarray, w: np.ndarray) -> float:
    """``max_t (−⟨d, g_t⟩)₊ / (‖g_t‖ · sqrt(trace K))``: the constraints on each one's scale."""
    norms = np.sqrt(np.clip(np.diag(K), 0, None))
    live = norms > 0
    breach = np.clip(-(K @ w)[live], 0, None) / norms[live]
    return float(breach.max(initial=0.0) / np.sqrt(np.trace(K)))


def measure(
    solver: str, variant: str, problems: list[Problem], exact: list[np.ndarray | None] | None
) -> dict[str, Any]:
    """One backend and variant on ``problems``; with ``exact`` None, judged by the certificate."""
    solve = VARIANTS[variant]
    errors, ascents, times, failures = [], [], [], 0
    for k, (K, c) in enumerate(problems):
        start = time.perf_counter()
        try:
            w = solve(K, c, solver)
        except Exception:  # a backend refusing a problem is a result, not a crash
            failures += 1
            continue
        times.append(time.perf_counter() - start)
        if w.shape != c.shape or not np.all(np.isfinite(w)):
            failures += 1
            continue
        ascents.append(ascent(K, w))
        if exact is None:
            errors.append(accuracy(K, c, w, None))
        elif exact[k] is not None:
            errors.append(accuracy(K, c, w, exact[k]))
    return {
        "max_error": max(errors, default=None),
        "median_error": statistics.median(errors) if errors else None,
        "max_ascent": max(ascents, default=None),
        "median_time_s": statistics.median(times) if times else None,
        "failures": failures,
        "count": len(problems),
    }


def _table(
    rows: list[dict[str, Any]], objectives: list[int], title: str, fmt: Callable[..., str]
) -> list[str]:
    """Rows: solver × variant; a column per ``T``, ``fmt(random, degenerate)`` in each."""
    cell = {(r["solver"], r["variant"], r["t"], r["degenerate"]): r for r in rows}
    lines = [
        title,
        "",
        "| solver | variant | " + " | ".join(f"T = {t}" for t in objectives) + " |",
        "|---|---|" + "---:|" * len(objectives),
    ]
    for solver in SOLVERS:
        for variant in VARIANTS:
            cells = [
                fmt(cell[solver, variant, t, False], cell[solver, variant, t, True])
                for t in objectives
            ]
            lines.append(f"| {solver} | {variant} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(rows: list[dict[str, Any]], objectives: list[int]) -> str:
    def largest(key: str) -> Callable[[dict[str, Any], dict[str, Any]], str]:
        def fmt(*runs: dict[str, Any]) -> str:
            return " / ".join("—" if r[key] is None else f"{r[key]:.0e}" for r in runs)

        return fmt

    def time_and_failures(random: dict[str, Any], degenerate: dict[str, Any]) -> str:
        median = random["median_time_s"]
        failed = random["failures"] + degenerate["failures"]
        time_cell = "—" if median is None else f"{1e6 * median:.0f} µs"
        return f"{time_cell} ({failed}/{random['count'] + degenerate['count']})"

    brute = [t for t in objectives if t <= MAX_BRUTE_FORCE]
    lines = [
        *_table(
            rows,
            objectives,
            "Largest error, random / degenerate problems: distance of the directions relative "
            f"to sqrt(trace K) against brute force (T = {', '.join(map(str, brute))}), else "
            "the KKT certificate",
            largest("max_error"),
        ),
        *_table(
            rows,
            objectives,
            "Largest ascent, random / degenerate: max_t (−⟨d, g_t⟩)₊ / (‖g_t‖·sqrt(trace K))",
            largest("max_ascent"),
        ),
        *_table(
            rows,
            objectives,
            "Median time per call on random problems (failures: no answer, of all problems)",
            time_and_failures,
        ),
    ]
    left_out = [
        f"{r['unreferenced']} {'degenerate' if r['degenerate'] else 'random'} at T = {r['t']}"
        for r in rows
        if r["solver"] == SOLVERS[0] and r["variant"] == "raw" and r["unreferenced"]
    ]
    if left_out:
        lines.append("Problems without a brute-force reference, left out: " + ", ".join(left_out))
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--objectives", type=int, nargs="+", default=[2, 3, 5, 10])
    parser.add_argument("--count", type=int, default=100, help="problems per T and kind")
    parser.add_argument("--out", type=Path, default=None, help="write JSON and Markdown here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for t in args.objectives:
        for degenerate in (False, True):
            rng = np.random.default_rng(t + 1000 * degenerate)
            problems = [problem(rng, t, degenerate) for _ in range(args.count)]
            exact = [brute_force(K, c) for K, c in problems] if t <= MAX_BRUTE_FORCE else None
            unreferenced = 0 if exact is None else sum(w is None for w in exact)
            for solver in SOLVERS:
                for variant in VARIANTS:
                    result = measure(solver, variant, problems, exact)
                    rows.append(
                        {"solver": solver, "variant": variant, "t": t, "degenerate": degenerate}
                        | result
                        | {"unreferenced": unreferenced}
                    )
            print(f"T = {t}, degenerate = {degenerate}: done", flush=True)
    report.write(rows, markdown(rows, args.objectives), args.out)


if __name__ == "__main__":
    main()

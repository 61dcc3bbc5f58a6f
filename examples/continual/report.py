"""ACC, BWT and FWT as Lopez-Paz & Ranzato (2017) define them; the table and the plot.

With ``R[i][j]`` the test accuracy on task ``j`` after training task ``i`` (``T`` tasks)
and ``b[j]`` that of the untrained model:

* ACC = (1/T) Σ_j R[T−1][j], the final average accuracy;
* BWT = 1/(T−1) Σ_{j<T−1} (R[T−1][j] − R[j][j]), how much learning later tasks changed
  the earlier ones (negative: forgetting);
* FWT = 1/(T−1) Σ_{j≥1} (R[j−1][j] − b[j]), how much learning earlier tasks helped a
  task before it was trained.

(The authors' ``metrics.py`` divides both sums by ``T`` instead of ``T − 1``.)
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

__all__ = ["metrics", "plot", "summarise", "table"]

LABELS = {
    "sgd": "plain SGD",
    "gem": "GEMProjector, default margin 0.5",
    "gem-margin0": "GEMProjector, margin 0",
    "agem": "GEMProjector, A-GEM (one mixed batch)",
    "original": "original GEM code (margin 0.5, ridge 1e-3)",
}


def metrics(accuracy: list[list[float]], baseline: list[float]) -> dict[str, float]:
    """ACC, BWT and FWT of one run (BWT and FWT are 0 for a single task)."""
    T = len(accuracy)
    final = accuracy[-1]
    bwt = [final[j] - accuracy[j][j] for j in range(T - 1)]
    fwt = [accuracy[j - 1][j] - baseline[j] for j in range(1, T)]
    return {
        "ACC": sum(final) / T,
        "BWT": sum(bwt) / max(T - 1, 1),
        "FWT": sum(fwt) / max(T - 1, 1),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: mean and standard deviation over seeds of each metric, mean ``R``."""
    summary: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == method]
        entry: dict[str, Any] = {"seeds": len(mine)}
        for key in ("ACC", "BWT", "FWT"):
            values = [run["metrics"][key] for run in mine]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows = [run["accuracy"] for run in mine]
        entry["accuracy"] = [
            [statistics.fmean(r[i][j] for r in rows) for j in range(len(rows[0][i]))]
            for i in range(len(rows[0]))
        ]
        entry["worst_cosine_after"] = min(run["worst_cosine_after"] for run in mine)
        summary[method] = entry
    return summary


def table(summary: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: mean ± std over seeds."""
    lines = ["| learner | ACC | BWT | FWT |", "|---|---|---|---|"]
    for method, entry in summary.items():
        cells = [f"{entry[k]:+.3f} ± {entry[f'{k}_std']:.3f}" for k in ("ACC", "BWT", "FWT")]
        cells[0] = cells[0].lstrip("+")
        lines.append(f"| {LABELS.get(method, method)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy on each task after each task of training, one panel per learner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, axes = plt.subplots(
        1, len(methods), figsize=(3.2 * len(methods), 3.2), sharey=True, squeeze=False
    )
    for ax, method in zip(axes[0], methods, strict=True):
        R = summary[method]["accuracy"]
        T = len(R)
        for j in range(T):
            ax.plot(range(j + 1, T + 1), [R[i][j] for i in range(j, T)], marker=".", lw=1)
        ax.set_title(LABELS.get(method, method), fontsize=8)
        ax.set_xlabel("tasks trained")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("test accuracy of each task")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Mean ± std over seeds, the printed table, and the plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

Summary = dict[str, Any]


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarise(runs: list[dict[str, Any]], pretrained: dict[str, Any], source: str) -> Summary:
    """Per method: ``[mean, std]`` over seeds of each score."""
    before = pretrained["mlm_loss"][source]
    out: Summary = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == method]
        targets = [lang for lang in mine[0]["accuracy"] if lang != source]
        unseen = [lang for lang in targets if lang not in mine[0]["sources"]]
        out[method] = {
            "sources": mine[0]["sources"],
            "source_accuracy": _mean_std([r["accuracy"][source] for r in mine]),
            "zero_shot": {lang: _mean_std([r["accuracy"][lang] for r in mine]) for lang in targets},
            "zero_shot_mean": _mean_std(
                [statistics.fmean(r["accuracy"][lang] for lang in unseen) for r in mine]
            ),
            "mlm_loss": _mean_std([r["mlm_loss"][source] for r in mine]),
            "mlm_loss_increase": _mean_std([r["mlm_loss"][source] - before for r in mine]),
            "mlm_loss_all": _mean_std([statistics.fmean(r["mlm_loss"].values()) for r in mine]),
            "perplexity": _mean_std([math.exp(r["mlm_loss"][source]) for r in mine]),
            "xsr_p1": _mean_std([statistics.fmean(r["xsr_p1"].values()) for r in mine]),
            "memory_batch_delta_sum": _mean_std([sum(r["memory_batch_deltas"]) for r in mine]),
            "memory_batch_steps_up": _mean_std(
                [statistics.fmean(d > 0 for d in r["memory_batch_deltas"]) for r in mine]
            ),
            "seconds": _mean_std([r["seconds"] for r in mine]),
        }
    return out


def table(summary: Summary, pretrained: dict[str, Any], source: str) -> str:
    """The table as Markdown: accuracies in %, MLM loss on the source's held-out text.

    A ``*`` marks a language the method was trained on (the multi-source rows' second
    source); the zero-shot mean leaves it out.
    """
    first = next(iter(summary.values()))
    targets = list(first["zero_shot"])

    def cell(pair: list[float], scale: float = 100.0, digits: int = 1) -> str:
        return f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}"

    head = ["method", f"{source} (source)", *targets, "zero-shot mean"]
    head += [f"MLM loss {source}", "Δ MLM loss", "MLM loss all", "XSR P@1", "Σ step Δ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    before = pretrained["mlm_loss"]
    xsr_before = sum(pretrained["xsr_p1"].values()) / len(pretrained["xsr_p1"])
    row = ["pre-trained", "", *[""] * len(targets), "", f"{before[source]:.3f}", ""]
    row += [f"{sum(before.values()) / len(before):.3f}", f"{100 * xsr_before:.1f}", ""]
    lines.append("| " + " | ".join(row) + " |")
    for method, s in summary.items():
        row = [method, cell(s["source_accuracy"])]
        row += [
            cell(s["zero_shot"][lang]) + ("*" if lang in s["sources"] else "") for lang in targets
        ]
        row += [cell(s["zero_shot_mean"]), cell(s["mlm_loss"], 1, 3)]
        row += [cell(s["mlm_loss_increase"], 1, 3), cell(s["mlm_loss_all"], 1, 3)]
        row += [cell(s["xsr_p1"]), cell(s["memory_batch_delta_sum"], 1, 2)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(summary: Summary, pretrained: dict[str, Any], source: str, path: Path) -> None:
    """Four bar charts with ±std: source and zero-shot accuracy, MLM loss, XSR P@1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    panels = [
        ("source_accuracy", f"accuracy on {source} (source), %", 100.0, None),
        ("zero_shot_mean", "zero-shot accuracy, mean of targets, %", 100.0, None),
        ("mlm_loss", f"MLM loss on held-out {source} text", 1.0, pretrained["mlm_loss"][source]),
        (
            "xsr_p1",
            "XSR P@1, mean of targets, %",
            100.0,
            100 * sum(pretrained["xsr_p1"].values()) / len(pretrained["xsr_p1"]),
        ),
    ]
    from matplotlib.lines import Line2D

    groups = {"naive": "tab:red", "gem": "tab:blue", "other": "tab:grey"}

    def colour(method: str) -> str:
        return groups["naive" if method == "naive" else "gem" if "gem" in method else "other"]

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    for ax, (key, title, scale, line) in zip(axes.flat, panels, strict=True):
        means = [summary[m][key][0] * scale for m in methods]
        stds = [summary[m][key][1] * scale for m in methods]
        # Points, not bars: the axis is zoomed on the differences and does not start at 0.
        for i, (method, mean, std) in enumerate(zip(methods, means, stds, strict=True)):
            ax.errorbar(i, mean, yerr=std, fmt="o", color=colour(method), capsize=3)
        low, high = min(means) - max(stds), max(means) + max(stds)
        if line is not None:
            ax.axhline(line, color="black", linestyle="--", linewidth=1)
            low, high = min(low, line), max(high, line)
        margin = 0.15 * (high - low) or 1.0
        low, high = low - margin, high + margin
        if scale == 100.0:
            low, high = max(low, 0.0), min(high, 100.0)
        ax.set_ylim(low, high)
        ax.grid(axis="y", linewidth=0.5, alpha=0.5)
        ax.set_title(title + " (axis zoomed)", fontsize=10)
    for ax in axes[1]:
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
    handles = [
        Line2D([], [], marker="o", linestyle="", color=groups["naive"], label="naive fine-tuning"),
        Line2D([], [], marker="o", linestyle="", color=groups["gem"], label="GEM / A-GEM rows"),
        Line2D([], [], marker="o", linestyle="", color=groups["other"], label="other methods"),
        Line2D([], [], color="black", linestyle="--", label="pre-trained model"),
    ]
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=9, frameon=False)
    fig.text(0.5, 0.005, "mean ± std over the seeds", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The benchmark's outputs: Markdown tables (also printed), a plot, and JSON merging."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["markdown", "merge", "plot", "problems", "write"]

WIDE_SPREAD = 0.5
"""A figure whose interquartile range exceeds this fraction of its median (±25 %) is noise."""

PART_MARGIN = 0.05
"""How much longer than the whole surgery's upper quartile a part may take unflagged.

Uniform's apply part is nearly all of its surgery: the two differ by the clock's noise.
"""


def write(results: object, table: str, out: Path | None) -> None:
    """Print ``table``; with ``out``, write ``OUT.json`` (``results``) and ``OUT.md``."""
    print(table)
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table)


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.1f} ms" if ms >= 100 else f"{ms:.2f} ms" if ms >= 1 else f"{ms:.3f} ms"


def _spread(entry: dict[str, Any]) -> str:
    median = entry["median_s"]
    return f"±{50 * (entry['q3_s'] - entry['q1_s']) / median:.0f} %" if median > 0 else "—"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}" if n >= 2**20 else f"{n / 2**20:.2f}"


def _machines(doc: dict[str, Any]) -> list[str]:
    lines = []
    for i, run in enumerate(doc["runs"]):
        m, s = run["machine"], run["settings"]
        lines.append(
            f"- run {i}: {m['device_name']} ({m['device']}), {m['date']}, torch {m['torch']}, "
            f"gradsurgery {m['gradsurgery']}, CPU kernels {m.get('cpu_kernels', 'off')}; "
            f"{s['repeat']} samples after {s['warmup']} "
            f"warm-ups, validate={s['validate']}, clock={s.get('clock', 'wall')}"
        )
    return lines


def _bandwidth(entry: dict[str, Any]) -> float:
    """The floor's bandwidth in GB/s (earlier runs recorded a copy's only)."""
    return float(entry.get("bandwidth_GBps", entry.get("copy_bandwidth_GBps", 0.0)))


def problems(doc: dict[str, Any]) -> list[str]:
    """Why the figures of ``doc`` cannot be trusted as they stand (none: an empty list).

    A machine loaded above its cores (timed by the wall clock), a median whose interquartile
    range exceeds :data:`WIDE_SPREAD` of it, a part (Gram, solve, apply) slower than the
    whole surgery's upper quartile by more than :data:`PART_MARGIN`, a surgery faster than
    the memory-bandwidth floor, a floor whose samples spread beyond :data:`WIDE_SPREAD`, or
    a memory bandwidth that drifts beyond it between the configurations of one size and
    dtype: each means the clock measured the machine's other work, not the surgery.
    """
    found = []
    bandwidths: dict[str, list[tuple[float, str]]] = {}
    for i, run in enumerate(doc["runs"]):
        machine, wall = run["machine"], run["settings"].get("clock", "wall") == "wall"
        load, cores = machine.get("load_average"), machine.get("cores")
        if wall and load is not None and cores is not None and load > cores:
            found.append(
                f"run {i}: the load average was {load:.1f} on {cores} cores: other work "
                "competed for them (on a shared CPU use --threads 1 --clock thread)"
            )
    for r in doc["results"]:
        where = f"{r['size']} {r['dtype']} t={r['t']}"
        for method, e in r["methods"].items():
            if "ratio_to_floor" not in e:
                continue
            total = e["total"]
            spread = (total["q3_s"] - total["q1_s"]) / total["median_s"]
            if spread > WIDE_SPREAD:
                found.append(
                    f"{method} {where}: spread {_spread(total)} of the median (more --repeat, "
                    "or a quieter machine)"
                )
            for part in ("gram", "solve", "apply"):
                if part in e and e[part]["median_s"] > (1 + PART_MARGIN) * total["q3_s"]:
                    found.append(
                        f"{method} {where}: its {part} ({_ms(e[part]['median_s'])}) took "
                        f"longer than the whole surgery ({_ms(total['median_s'])}, upper "
                        f"quartile {_ms(total['q3_s'])})"
                    )
            if e["ratio_to_floor"] < 1:
                found.append(
                    f"{method} {where}: {e['ratio_to_floor']:.2f}× the floor, faster than "
                    "reading its gradients once allows: the floor's samples were slowed down"
                )
            floor = e.get("floor_samples", [])
            if len(floor) >= 2:
                q1, median, q3 = statistics.quantiles(floor, n=4, method="inclusive")
                if q3 - q1 > WIDE_SPREAD * median:
                    found.append(
                        f"{method} {where}: the floor's samples spread "
                        f"±{50 * (q3 - q1) / median:.0f} % of their median: the memory "
                        "bandwidth changed while timing"
                    )
            if "ratio_to_floor" in e:
                bandwidths.setdefault(f"{r['size']} {r['dtype']}", []).append(
                    (_bandwidth(e), f"{method} t={r['t']}")
                )
    for where, seen in bandwidths.items():
        (low, slow), (high, fast) = min(seen), max(seen)
        if high > (1 + WIDE_SPREAD) * low:
            found.append(
                f"{where}: the memory bandwidth drifted from {high:.1f} GB/s ({fast}) to "
                f"{low:.1f} GB/s ({slow}), beyond ±{50 * WIDE_SPREAD:.0f} %: the floors of "
                "one size are not comparable (a quieter machine)"
            )
    return found


def markdown(doc: dict[str, Any]) -> str:
    """Tables of every configuration: the library's surgeries, PhasedLR, and the peers.

    What :func:`problems` finds comes first, as warnings.
    """
    results = doc["results"]
    found = problems(doc)
    warning = (
        [
            "",
            "**Warning: these figures are not a valid measurement as they stand:**",
            "",
            *(f"- {problem}" for problem in found),
        ]
        if found
        else []
    )
    lines = [
        *_machines(doc),
        *warning,
        "",
        "Surgery per step: median (interquartile spread), its ratio to the floor, and the "
        "same work in parts; host syncs per step with validate=False; extra memory kept / "
        "largest transient allocation, MiB",
        "",
        "| size | dtype | t | method | surgery | spread | × floor | GB/s | Gram | solve | apply "
        "| syncs | extra / transient |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    phased_lines = []
    for r in results:
        for method, e in r["methods"].items():
            head = f"| {r['size']} | {r['dtype']} | {r['t']} | {method} |"
            if "skipped" in e:
                if r["t"] > 1 or method in ("gem", "agem"):  # T = 1 is no multi-objective case
                    lines.append(f"{head} skipped: {e['skipped']} |" + " |" * 8)
            elif method == "phased":
                phased_lines.append(
                    f"| {r['size']} | {r['dtype']} | {_ms(e['total']['median_s'])} | "
                    f"{_ms(e['inner_step']['median_s'])} | {_ms(e['bookkeeping_s'])} | "
                    f"{e['host_syncs']} |"
                )
            else:
                lines.append(
                    f"{head} {_ms(e['total']['median_s'])} | {_spread(e['total'])} | "
                    f"{e['ratio_to_floor']:.2f}× | {_bandwidth(e):.1f} | "
                    + " | ".join(
                        _ms(e[part]["median_s"]) if part in e else "none"
                        for part in ("gram", "solve", "apply")
                    )
                    + f" | {e['host_syncs']} | {_mib(e['extra_memory_bytes'])} / "
                    f"{_mib(e['transient_bytes'])} |"
                )
    if phased_lines:
        lines += [
            "",
            "PhasedLR: its step, the inner SGD step alone, the difference (bookkeeping)",
            "",
            "| size | dtype | PhasedLR step | inner step | bookkeeping | syncs |",
            "|---|---|---:|---:|---:|---:|",
            *phased_lines,
        ]
    peer_lines = []
    for r in results:
        for name, e in r.get("peers", {}).items():
            head = f"| {r['size']} | {r['dtype']} | {r['t']} | {name} |"
            if "skipped" in e:
                peer_lines.append(f"{head} skipped: {e['skipped']} | | |")
                continue
            ours = r["methods"][e["of"]]["total"]["median_s"]
            peer_lines.append(
                f"{head} {_ms(e['total']['median_s'])} | "
                f"{e['total']['median_s'] / ours:.1f}× | {e['relative_difference']:.0e} |"
            )
    if peer_lines:
        lines += [
            "",
            "Peers on the same rows: time, how many times gradsurgery's surgery time, "
            "relative difference of the direction from gradsurgery's",
            "",
            "| size | dtype | t | peer | time | × gradsurgery | difference |",
            "|---|---|---:|---|---:|---:|---:|",
            *peer_lines,
        ]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """Cost against parameter count, one panel per (dtype, t), one line per method.

    Returns why no plot was written (matplotlib missing, fewer than one size), else None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'gradsurgery[bench]'): no plot"
    panels: dict[tuple[str, int], dict[str, list[tuple[int, float]]]] = {}
    for r in doc["results"]:
        lines = panels.setdefault((r["dtype"], r["t"]), {})
        for method, e in r["methods"].items():
            if "ratio_to_floor" in e:
                lines.setdefault(method, []).append((r["p"], e["total"]["median_s"]))
                lines.setdefault(f"floor ({method})", []).append((r["p"], e["floor_s"]))
        for name, e in r.get("peers", {}).items():
            if "total" in e:
                lines.setdefault(name, []).append((r["p"], e["total"]["median_s"]))
    panels = {key: lines for key, lines in panels.items() if lines}
    if not panels:
        return "nothing to plot"
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    names = sorted({name for lines in panels.values() for name in lines if "floor" not in name})
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colours = {name: palette(i % palette.N) for i, name in enumerate(names)}
    for ax, ((dtype, t), lines) in zip(axes.flat, sorted(panels.items()), strict=False):
        floors = {k: v for k, v in lines.items() if k.startswith("floor")}
        floor = max(floors.items(), key=lambda item: max(s for _, s in item[1]))[1]
        for name, points in sorted(lines.items()):
            if name.startswith("floor"):
                continue
            xs, ys = zip(*sorted(points), strict=True)
            style = "--" if " " in name else "-"
            ax.plot(xs, ys, style, marker="o", color=colours[name], label=name)
        xs, ys = zip(*sorted(floor), strict=True)
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="seconds per step")
        bottom = min(ax.get_ylim()[0], min(ys) / 3)
        ax.fill_between(xs, bottom, ys, color="0.85", zorder=0, label="below the floor")
        ax.plot(xs, ys, ":", color="black", linewidth=2, label="floor (largest)")
        ax.set_ylim(bottom=bottom)
        ax.set_title(f"{dtype}, t = {t}")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One document from several runs' JSON (their runs listed, results re-indexed)."""
    merged: dict[str, Any] = {"schema": 1, "runs": [], "results": []}
    for doc in docs:
        offset = len(merged["runs"])
        merged["runs"] += doc["runs"]
        merged["results"] += [{**r, "run": r["run"] + offset} for r in doc["results"]]
    return merged

r"""``python -m gradsurgery.bench``: measure what gradient surgery costs on this machine.

.. code-block:: bash

    python -m gradsurgery.bench --device cuda --params bert-base mbert xlmr-base \\
        --dtype fp32 bf16 --t 1 2 4 8 --out results/h100
    python -m gradsurgery.bench --render results/a.json results/b.json --out results/all

Writes ``OUT.json`` (machine, versions, settings, every sample), ``OUT.md`` (the tables,
also printed) and ``OUT.png`` (cost against parameter count). See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import gradsurgery
from gradsurgery import kernels
from gradsurgery.bench import report, timing
from gradsurgery.bench.methods import METHODS
from gradsurgery.bench.runner import Settings, memory_limit, run_config
from gradsurgery.bench.workload import DTYPES, PRESETS, parse_size

__all__ = ["machine_info", "main"]

DEFAULT_METHODS = ["gem", "agem", "lfmlf", "pcgrad", "gradvac", "mgda", "phased"]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load() -> float | None:
    """The load average over the last minute (None where the system does not tell)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cores() -> int:
    """The CPU cores this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on, and with which versions."""
    threads = torch.get_num_threads()
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, "
        f"{threads} thread{'s' if threads > 1 else ''}"
    )
    return {
        "device": str(device),
        "device_name": name,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gradsurgery": gradsurgery.__version__,
        "threads": threads,
        "cores": _cores(),
        "peers": {pkg: _version(pkg) for pkg in ("torchjd", "quadprog", "numpy")},
        "cpu_kernels": f"numba {_version('numba')}" if kernels.available() else "off",
    }


def _progress(total: int, quiet: bool) -> tuple[Callable[[str], None], Callable[[], None]]:
    if quiet:
        return (lambda label: None), (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def tick(label: str) -> None:
            filled = 30 * done[0] // max(1, total)
            bar = "#" * filled + "." * (30 - filled)
            print(f"\r[{bar}] {done[0]}/{total} {label:<40}", end="", file=sys.stderr, flush=True)
            done[0] += 1

        return tick, lambda: print(f"\r[{'#' * 30}] {total}/{total}", file=sys.stderr)
    bar = tqdm(total=total, file=sys.stderr)
    started = [False]

    def tqdm_tick(label: str) -> None:
        if started[0]:
            bar.update()
        started[0] = True
        bar.set_description(label)

    def close() -> None:
        bar.update()
        bar.close()

    return tqdm_tick, close


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except where the help text says it (``None`` and flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gradsurgery.bench",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=_Help,
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    parser.add_argument(
        "--params",
        nargs="+",
        default=["1e6"],
        help=f"parameter counts: numbers or presets {', '.join(PRESETS)}",
    )
    parser.add_argument(
        "--dtype", nargs="+", default=["fp32"], choices=list(DTYPES), help="gradient dtypes"
    )
    parser.add_argument(
        "--t", nargs="+", type=int, default=[1, 2, 4, 8], help="constraints (GEM) or objectives"
    )
    parser.add_argument(
        "--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS), help="wrappers"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip published GEM, TorchJD, …")
    parser.add_argument("--repeat", type=int, default=5, help="timed samples per figure")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before them")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--validate",
        choices=["on", "off", "auto"],
        default="auto",
        help="the wrappers' validate= (auto: on for the CPU, off for accelerators)",
    )
    parser.add_argument(
        "--max-bytes",
        type=float,
        default=None,
        help="skip what needs more memory (default: 3/4 of what is free)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="CPU timing: wall clock, or the thread's CPU time (needs --threads 1; for a "
        "shared machine)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--render",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: merge the OUT.json of earlier runs (other machines, dtypes, "
        "sizes) into one report, printed and, with --out, written as OUT.json/.md/.png",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write OUT.json, OUT.md, OUT.png (default: only print the tables)",
    )
    return parser


def _write(doc: dict[str, Any], out: Path | None) -> None:
    report.write(doc, report.markdown(doc), out)
    if out is None:
        return
    why = report.plot(doc, out.with_suffix(".png"))
    if why is not None:
        print(why, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or ``--render``) the benchmark; return the JSON document."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.render is not None:
        doc = report.merge([json.loads(path.read_text()) for path in args.render])
        _write(doc, args.out)
        return doc
    try:
        sizes = [parse_size(text) for text in args.params]
    except ValueError as error:
        parser.error(str(error))
    if args.repeat < 1 or args.warmup < 0 or min(args.t) < 1:
        parser.error("--repeat and every --t must be ≥ 1, --warmup ≥ 0")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        try:
            timing.use_clock(args.clock)
        except ValueError as error:
            parser.error(str(error))
    validate = args.validate == "on" or (args.validate == "auto" and device.type == "cpu")
    settings = Settings(
        device=device,
        repeat=args.repeat,
        warmup=args.warmup,
        validate=validate,
        peers=not args.no_peers,
        max_bytes=int(args.max_bytes) if args.max_bytes is not None else memory_limit(device),
    )
    methods = list(dict.fromkeys(args.methods))
    configs = [(s, d, t) for s in sizes for d in args.dtype for t in args.t]
    load = _load()
    tick, close = _progress(len(configs) * len(methods), args.quiet)
    results, phased_done = [], set()
    for (size, p), dtype, t in configs:
        run_methods = [m for m in methods if m != "phased" or (p, dtype) not in phased_done]
        phased_done.add((p, dtype))
        for _ in range(len(methods) - len(run_methods)):
            tick("")
        record = run_config(size, p, dtype, t, run_methods, settings, tick)
        results.append({"run": 0, **record})
    close()
    machine = machine_info(device)
    loads = [value for value in (load, _load()) if value is not None]
    machine["load_average"] = max(loads) if loads else None
    run = {"machine": machine, "settings": {**vars(args), "validate": validate}}
    run["settings"] = {k: v for k, v in run["settings"].items() if k not in ("render", "out")}
    doc = {"schema": 1, "runs": [run], "results": results}
    _write(doc, args.out)
    return doc

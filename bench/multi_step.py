"""Cost of one multi-objective step, next to the floor and to LibMTL-style and TorchJD code.

For each parameter count ``p`` and number of objectives ``T`` it measures, on one device:

* the surgery of each wrapper (``Uniform``, ``PCGrad`` with ``"sum"``, ``GradVac`` per model
  and per parameter tensor, ``MGDA``, ``ParetoLessForgetting``): the Gram matrix of its
  rows, the weights, ``d = Jᵀw`` written into ``.grad`` and, for LF-MLF, ``ḡ += d``; on
  ``T`` gradients written straight into the wrapper's flat buffer, as backward passes
  routed by ``opt.backward(...)`` leave them;
* ``floor``: the time to move the values a step must move, at the copy bandwidth measured
  on the same device, interleaved sample by sample with the surgery's own samples:
  ``(2T + 1)·p`` values (read the ``T`` rows for the Gram, read them again and write
  ``d``); ``(2T + 4)·p`` for LF-MLF (``ḡ`` is read with the rows for ``c = Jḡ``, and
  read and written once more to add ``d``, fused with writing ``d``);
* the inner optimizer's step (SGD) for scale;
* memory: the wrapper's extra bytes (its rows beyond ``.grad``) and the largest transient
  allocation during the surgery;
* peers on the same ``(T, p)`` gradients, with the time and the relative difference of
  their direction from gradsurgery's: PCGrad as LibMTL does it and MGDA by Sener & Koltun's
  Frank–Wolfe (both in ``bench/libmtl_style.py``), and TorchJD's ``PCGrad`` and ``MGDA``
  aggregators on the stacked matrix. PCGrad's random orders are matched: the LibMTL-style
  loop gets the wrapper's, and TorchJD's (drawn from the global RNG) are replayed through
  ``gradsurgery.functional.pcgrad`` for its reference.

Every figure is the median of ``--repeat`` timed runs after 2 warm-ups. The gradients have
norms spread over 0.5…2 and alternating conflicts (cosine ≈ −0.3 between rows of
different parity, +0.3 otherwise), so PCGrad projects and LF-MLF's constraints matter.
Results go to a JSON file (with every sample) and a Markdown table.

    python bench/multi_step.py --device cpu --params 1e6 1e8 --objectives 2 3 5 10
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from bench.gem_step import (
    bert_like_params,
    interleaved,
    machine_info,
    samples,
    timer,
    transient_bytes,
)
from bench.libmtl_style import mgda_frank_wolfe, pcgrad_loop
from gradsurgery import (
    MGDA,
    GradVac,
    MultiObjectiveOptimizer,
    ParetoLessForgetting,
    PCGrad,
    Uniform,
    gram,
)
from gradsurgery.functional.pcgrad import conflict_orders, pcgrad_coefficients

SEED = 0
SHARED = 0.65  # weight of the shared part: cosines ±SHARED²/(1 + SHARED²) ≈ ±0.3
Factory = Callable[[Optimizer, int, bool], MultiObjectiveOptimizer]


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


WRAPPERS: dict[str, Factory] = {
    "Uniform": lambda sgd, t, v: Uniform(sgd, t, validate=v),
    "PCGrad": lambda sgd, t, v: PCGrad(sgd, t, generator=_generator(), validate=v),
    "GradVac": lambda sgd, t, v: GradVac(sgd, t, generator=_generator(), validate=v),
    "GradVac/param": lambda sgd, t, v: GradVac(
        sgd, t, granularity="parameter", generator=_generator(), validate=v
    ),
    "MGDA": lambda sgd, t, v: MGDA(sgd, t, validate=v),
    "LF-MLF": lambda sgd, t, v: ParetoLessForgetting(sgd, t, validate=v),
}
PEERS = ["LibMTL PCGrad", "TorchJD PCGrad", "S&K MGDA", "TorchJD MGDA"]


def floor_values(method: str, t: int) -> int:
    """Values per parameter a step of ``method`` must move (see the module docstring)."""
    return 2 * t + 4 if method == "LF-MLF" else 2 * t + 1


def footprint_bytes(p: int, t: int) -> int:
    """Most memory a configuration holds at once, in bytes (fp32 rows of ``p`` values).

    The gradients (``T`` rows), the parameters and two reference directions, plus what the
    wrappers' phase adds: a wrapper's buffer (``T + 2`` rows), the floor's scratch row and
    the per-parameter GradVac's temporaries (3 rows). The peers' phase adds less (the
    LibMTL-style clone of the ``T`` rows, 2 temporaries and the output).
    """
    return 4 * p * ((t + 3) + (t + 6))


def objective_gradients(t: int, p: int, device: torch.device) -> Tensor:
    """``(T, p)`` gradients: independent parts plus a shared one of alternating sign."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    grads = torch.empty(t, p, device=device).normal_(generator=generator)
    shared = torch.empty(p, device=device).normal_(generator=generator)
    for i in range(t):
        grads[i].add_(shared, alpha=SHARED * (-1) ** i)
        grads[i].mul_(2.0 ** ((i % 3) - 1) / math.sqrt((1 + SHARED**2) * p))
    return grads


def relative_difference(x: Tensor, reference: Tensor) -> float:
    return float((x - reference).norm() / reference.norm())


def _summary(times: list[float], **extra: Any) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "samples": times, **extra}


# -- the wrappers ------------------------------------------------------------------------------


def measure_wrapper(
    method: str, params: list[Tensor], grads: Tensor, device: torch.device, repeat: int
) -> tuple[dict[str, Any], Tensor]:
    """Time one wrapper's surgery; return the result and its direction."""
    measure = timer(device)
    t = grads.shape[0]
    opt = WRAPPERS[method](torch.optim.SGD(params, lr=1e-3), t, device.type == "cpu")
    (block,) = opt.bank.blocks
    block[1 : 1 + t].copy_(grads)
    if isinstance(opt, ParetoLessForgetting):
        block[t + 1].copy_(grads.sum(dim=0))  # ḡ: some earlier steps' directions

    def clear() -> None:  # a step starts with .grad zero (the wrapper checks it)
        block[0].zero_()

    surgery, copies = interleaved(measure, opt._surgery, block[1], repeat, clear)
    values = floor_values(method, t)
    result: dict[str, Any] = _summary(surgery)
    result["floor_s"] = values / 2 * statistics.median(copies)
    result["floor_samples"] = [values / 2 * c for c in copies]
    result["copy_bandwidth_GBps"] = 2 * block.shape[1] * 4 / statistics.median(copies) / 1e9
    result["extra_memory_bytes"] = block[1:].numel() * block.element_size()
    clear()
    result["surgery_transient_bytes"] = transient_bytes(opt._surgery, device)
    if isinstance(opt, PCGrad):
        opt.generator.manual_seed(SEED)  # the orders the peers replay
    clear()
    opt._surgery()
    for q in params:  # let the buffer go before the next wrapper allocates its own
        q.grad = None
    return result, block[0].clone()


# -- the peers ---------------------------------------------------------------------------------


def torchjd_pcgrad_reference(grads: Tensor, out: Tensor) -> Tensor:
    """gradsurgery's PCGrad direction for the orders TorchJD draws after ``manual_seed``."""
    t = grads.shape[0]
    torch.manual_seed(SEED)
    orders = torch.stack(
        [perm[perm != i] for i, perm in enumerate(torch.randperm(t) for _ in range(t))]
    )
    weights = pcgrad_coefficients(gram.gram(grads), orders).sum(dim=0)
    return gram.combine_(out, grads, weights, accumulate=False)


def measure_peers(
    grads: Tensor, references: dict[str, Tensor], device: torch.device, repeat: int
) -> dict[str, Any]:
    measure = timer(device)
    out = torch.empty_like(grads[0])
    results: dict[str, Any] = {}
    if "PCGrad" in references:
        orders = conflict_orders(grads.shape[0], _generator())
        times = samples(measure, lambda: pcgrad_loop(grads, orders, out), repeat)
        results["LibMTL PCGrad"] = _summary(
            times, relative_difference=relative_difference(out, references["PCGrad"])
        )
    if "MGDA" in references:
        iterations: list[int] = []
        times = samples(measure, lambda: iterations.append(mgda_frank_wolfe(grads, out)), repeat)
        results["S&K MGDA"] = _summary(
            times,
            relative_difference=relative_difference(out, references["MGDA"]),
            iterations=iterations[-1],
        )
    try:
        from torchjd import aggregation
    except ImportError:
        skipped = {"skipped": "torchjd is not installed (pip install 'gradsurgery[bench]')"}
        return {**results, "TorchJD PCGrad": skipped, "TorchJD MGDA": skipped}
    for method in references:
        aggregator = getattr(aggregation, method)()

        def aggregate() -> None:
            out.copy_(aggregator(grads))  # noqa: B023 (called before the loop moves on)

        times = samples(measure, aggregate, repeat)
        torch.manual_seed(SEED)  # for PCGrad: the orders the reference replays
        aggregate()
        if method == "PCGrad":
            reference = torchjd_pcgrad_reference(grads, torch.empty_like(out))
        else:
            reference = references[method]
        results[f"TorchJD {method}"] = _summary(
            times, relative_difference=relative_difference(out, reference)
        )
    return results


# -- one configuration -------------------------------------------------------------------------


def run(
    p: int, t: int, device: torch.device, repeat: int, methods: list[str], peers: bool
) -> dict[str, Any]:
    params = bert_like_params(p, device, torch.float32)
    grads = objective_gradients(t, p, device)
    result: dict[str, Any] = {"p": p, "t": t, "n_tensors": len(params), "wrappers": {}}
    for q in params:
        q.grad = torch.zeros_like(q)
    sgd = torch.optim.SGD(params, lr=1e-3)
    result["inner_step"] = _summary(samples(timer(device), sgd.step, repeat))
    for q in params:
        q.grad = None
    references: dict[str, Tensor] = {}
    for method in methods:
        result["wrappers"][method], direction = measure_wrapper(
            method, params, grads, device, repeat
        )
        if method in ("PCGrad", "MGDA"):
            references[method] = direction
        gc.collect()
    if peers:
        result["peers"] = measure_peers(grads, references, device, repeat)
    return result


# -- output ------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms" if seconds >= 0.1 else f"{1e3 * seconds:.2f} ms"


def markdown(results: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    ran = [r for r in results if "skipped" not in r]
    methods = list(ran[0]["wrappers"]) if ran else []
    lines = [
        f"Multi-objective step on {machine['device_name']} ({machine['date']}, torch "
        f"{machine['torch']}); each cell: surgery time (its ratio to the floor: (2T + 1)·p "
        "fp32 values, (2T + 4)·p for LF-MLF, at the copy bandwidth measured next to it)",
        "",
        "| p | T | copy GB/s | inner SGD step | " + " | ".join(methods) + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(methods),
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['p']:.0e} | {r['t']} | skipped: {r['skipped']} |")
            continue
        cells = [
            f"{_ms(w['median_s'])} ({w['median_s'] / w['floor_s']:.2f}×)"
            for w in r["wrappers"].values()
        ]
        bandwidth = statistics.median(w["copy_bandwidth_GBps"] for w in r["wrappers"].values())
        lines.append(
            f"| {r['p']:.0e} | {r['t']} | {bandwidth:.1f} | {_ms(r['inner_step']['median_s'])} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Memory: extra rows kept by the wrapper (beyond `.grad`) / largest transient "
        "allocation during the surgery, MiB",
        "",
        "| p | T | " + " | ".join(methods) + " |",
        "|---:|---:|" + "---:|" * len(methods),
    ]
    for r in ran:
        cells = [
            f"{w['extra_memory_bytes'] / 2**20:.0f} / {w['surgery_transient_bytes'] / 2**20:.1f}"
            for w in r["wrappers"].values()
        ]
        lines.append(f"| {r['p']:.0e} | {r['t']} | " + " | ".join(cells) + " |")
    with_peers = [r for r in ran if "peers" in r]
    if with_peers:
        lines += [
            "",
            "Peers on the same gradients: time (× gradsurgery's surgery time), relative "
            "difference of the direction from gradsurgery's",
            "",
            "| p | T | " + " | ".join(PEERS) + " |",
            "|---:|---:|" + "---:|" * len(PEERS),
        ]
        for r in with_peers:
            cells = []
            for peer in PEERS:
                entry = r["peers"].get(peer, {})
                if "median_s" not in entry:
                    cells.append("—")
                    continue
                ours = r["wrappers"][peer.split()[1]]["median_s"]
                iterations = f", {entry['iterations']} it." if "iterations" in entry else ""
                cells.append(
                    f"{_ms(entry['median_s'])} ({entry['median_s'] / ours:.1f}×), "
                    f"diff {entry['relative_difference']:.0e}{iterations}"
                )
            lines.append(f"| {r['p']:.0e} | {r['t']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--params", type=float, nargs="+", default=[1e6])
    parser.add_argument("--objectives", type=int, nargs="+", default=[2, 3, 5, 10])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--methods", nargs="+", default=list(WRAPPERS), choices=list(WRAPPERS))
    parser.add_argument("--no-peers", action="store_true", help="skip LibMTL-style and TorchJD")
    parser.add_argument(
        "--max-bytes",
        type=float,
        default=None,
        help="skip configurations needing more (default: 3/4 of the device's memory)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write JSON and Markdown here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.max_bytes is not None:
        limit = int(args.max_bytes)
    elif device.type == "cuda":
        limit = torch.cuda.get_device_properties(device).total_memory * 3 // 4
    else:
        limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4
    machine = machine_info(device)
    results = []
    for p in (int(x) for x in args.params):
        for t in args.objectives:
            needed = footprint_bytes(p, t)
            if needed > limit:
                reason = f"needs ~{needed / 1e9:.1f} GB, more than the {limit / 1e9:.1f} GB allowed"
                print(f"p = {p:.0e}, T = {t}: skipped, {reason} (--max-bytes)", flush=True)
                results.append({"p": p, "t": t, "skipped": reason})
                continue
            result = run(p, t, device, args.repeat, args.methods, not args.no_peers)
            results.append(result)
            medians = {
                name: entry.get("median_s", entry.get("skipped"))
                for group in ("wrappers", "peers")
                for name, entry in result.get(group, {}).items()
            }
            print(json.dumps({"p": p, "t": t, **medians}), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = markdown(results, machine)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"machine": machine, "results": results}, indent=1)
        )
        args.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()

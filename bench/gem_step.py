"""Cost of one GEM projection step, next to the published GEM code, TorchJD, and the floor.

For each parameter count ``p`` and number of constraints ``t`` it measures, on one device:

* ``gradsurgery``: ``GEMProjector``'s surgery (Gram, dual solve, ``x = g + Jᵀv`` in place)
  on gradients that backward passes wrote straight into the flat buffer;
* ``published``: the approach of the original GEM code (Lopez-Paz & Ranzato, 2017, also used
  by Liu et al. 2021), re-implemented here: each gradient is copied parameter by parameter
  into a column of a ``(p, t + 1)`` matrix, the memories are copied to the host in float64,
  the Gram and the projection are done in NumPy with quadprog (``eps = 1e-3`` ridge), and
  the result is copied back parameter by parameter;
* ``torchjd``: TorchJD's ``DualProj`` aggregator with preference vector ``e₀`` applied to
  the stacked ``[g; J]`` (it projects ``g`` onto the dual cone of the rows, which is GEM's
  projection), its result then written into ``.grad``; skipped if TorchJD is not installed;
* ``floor``: the time to move the bytes a projection must move, ``(2t + 3)·p`` values
  (read ``[g; J]`` for the Gram, read it again and write ``x``), at the copy bandwidth
  measured on the same device, interleaved with the surgery's own samples;
* the inner optimizer's step (SGD) for scale.

Every figure is the median of ``--repeat`` timed runs after a warm-up. Gradients are built
so that the constraints are violated (the projection is never skipped). Results go to a
JSON file (with every sample) and a Markdown table.

    python bench/gem_step.py --device cpu --params 1e6 1e8 --constraints 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gradsurgery
from gradsurgery import GEMProjector

# Parameter shapes of one BERT-base encoder layer, repeated to reach the requested size.
_LAYER = [(768, 768), (768,)] * 4 + [(3072, 768), (3072,), (768, 3072), (768,), (768,), (768,)]


def bert_like_params(p: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Parameters shaped like BERT layers (shrunk for small ``p``) totalling ``p`` values."""
    layer_size = sum(int(np.prod(s)) for s in _LAYER)
    scale = min(1.0, p / layer_size)
    shapes = [tuple(max(1, int(d * scale**0.5)) for d in s) for s in _LAYER]
    params: list[torch.Tensor] = []
    total = 0
    while total < p:
        for shape in shapes:
            n = int(np.prod(shape))
            if total + n > p:
                shape, n = (p - total,), p - total
            if n:
                params.append(torch.nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))
            total += n
            if total >= p:
                break
    return params


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def measure(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end)) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin

    return measure


def samples(
    measure: Callable[[Callable[[], Any]], float],
    fn: Callable[[], Any],
    repeat: int,
    setup: Callable[[], Any] = lambda: None,
) -> list[float]:
    for _ in range(2):  # warm-up: first touch of fresh memory, lazy initialisation
        setup()
        fn()
    out = []
    for _ in range(repeat):
        setup()
        out.append(measure(fn))
    return out


def interleaved(
    measure: Callable[[Callable[[], Any]], float],
    fn: Callable[[], Any],
    row: torch.Tensor,
    repeat: int,
    setup: Callable[[], Any] = lambda: None,
) -> tuple[list[float], list[float]]:
    """``repeat`` samples of ``fn`` and of copying ``row``, alternated, after 2 warm-ups.

    A copy moves ``2·row.numel()`` values; timed next to ``fn`` sample by sample, it gives
    the bandwidth (and so the floor) of the same moments, which drifts as ``fn``'s does.
    """
    scratch = torch.empty_like(row)
    timed, copies = [], []
    for _ in range(repeat + 2):
        setup()
        timed.append(measure(fn))
        copies.append(measure(lambda: scratch.copy_(row)))
    return timed[2:], copies[2:]


def transient_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Largest memory ``fn`` allocates on top of what exists (CUDA: peak; CPU: largest block)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((int(e.cpu_memory_usage) for e in prof.events()), default=0)


def conflicting_rows(block: torch.Tensor, seed: int) -> None:
    """Fill a ``(t + 1, p)`` block with random constraint rows and a task row against them."""
    generator = torch.Generator(device=block.device).manual_seed(seed)
    block.normal_(generator=generator)
    block[0] -= block[1:].sum(dim=0) * (2.0 / max(1, block.shape[0] - 1))


# -- the published GEM code's approach, re-implemented ---------------------------------------


def store_grad(grads: list[torch.Tensor], matrix: torch.Tensor, column: int) -> None:
    offset = 0
    for grad in grads:
        matrix[offset : offset + grad.numel(), column].copy_(grad.reshape(-1))
        offset += grad.numel()


def overwrite_grad(params: list[torch.Tensor], column: torch.Tensor) -> None:
    offset = 0
    for p in params:
        assert p.grad is not None
        p.grad.copy_(column[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def published_step(
    params: list[torch.Tensor],
    rows: list[list[torch.Tensor]],
    matrix: torch.Tensor,
    eps: float = 1e-3,
) -> None:
    import quadprog

    t = len(rows) - 1
    for k in range(t):
        store_grad(rows[k + 1], matrix, k)
    store_grad(rows[0], matrix, t)
    memories = matrix[:, :t]
    gradient = matrix[:, t]
    if bool(((gradient @ memories) < 0).any()):
        memories_np = memories.cpu().t().double().numpy()
        gradient_np = gradient.cpu().double().numpy()
        P = memories_np @ memories_np.T
        P = 0.5 * (P + P.T) + np.eye(t) * eps
        q = -(memories_np @ gradient_np)
        v = quadprog.solve_qp(P, q, np.eye(t), np.zeros(t))[0]
        x = v @ memories_np + gradient_np
        gradient.copy_(torch.as_tensor(x, dtype=torch.float32).to(gradient.device))
        overwrite_grad(params, gradient)


# -- one configuration -------------------------------------------------------------------------


def run(p: int, t: int, device: torch.device, repeat: int, methods: set[str]) -> dict[str, Any]:
    measure = timer(device)
    params = bert_like_params(p, device, torch.float32)
    opt = GEMProjector(
        torch.optim.SGD(params, lr=1e-3), constraints=t, validate=device.type == "cpu"
    )
    block = opt.bank.blocks[0]
    conflicting_rows(block, seed=t)
    task = block[0].clone()
    result: dict[str, Any] = {"p": p, "t": t, "n_tensors": len(params)}

    def restore() -> None:
        block[0].copy_(task)

    # The floor for (2t + 3)p values is (2t + 3)/2 row copies.
    surgery, copies = interleaved(measure, opt._surgery, task, repeat, restore)
    restore()
    opt._surgery()
    reference = block[0].clone()
    result["gradsurgery"] = {"median_s": statistics.median(surgery), "samples": surgery}
    result["inner_step"] = {"samples": samples(measure, opt.optimizer.step, repeat)}
    result["inner_step"]["median_s"] = statistics.median(result["inner_step"]["samples"])
    result["extra_memory_bytes"] = sum(b[1:].numel() * b.element_size() for b in opt.bank.blocks)
    restore()
    result["surgery_transient_bytes"] = transient_bytes(opt._surgery, device)
    result["copy_bandwidth_GBps"] = 2 * p * 4 / statistics.median(copies) / 1e9
    result["floor_s"] = (2 * t + 3) / 2 * statistics.median(copies)
    result["floor_samples"] = [(2 * t + 3) / 2 * c for c in copies]

    def error(x: torch.Tensor) -> float:
        return float((x - reference).norm() / reference.norm())

    if "published" in methods:
        # what the backward passes produced, per parameter: the task row, then each memory row
        sources = [task, *block[1:]]
        rows = [
            [row[s].view_as(q) for q, s in zip(params, _slices(params), strict=True)]
            for row in sources
        ]
        for q in params:
            q.grad = torch.zeros_like(q)  # the original keeps ordinary .grad tensors
        matrix = torch.zeros(p, t + 1, device=device)
        times = samples(measure, lambda: published_step(params, rows, matrix), repeat)
        x = torch.cat([q.grad.reshape(-1) for q in params if q.grad is not None])
        result["published"] = {
            "median_s": statistics.median(times),
            "samples": times,
            "relative_error": error(x),
        }
        del matrix
        opt.bank.bind(0)
    if "torchjd" in methods:
        try:
            from torchjd.aggregation import DualProj
        except ImportError:
            result["torchjd"] = {
                "skipped": "torchjd is not installed (pip install 'gradsurgery[bench]')"
            }
        else:
            aggregator = DualProj(pref_vector=torch.eye(t + 1, device=device)[0])

            def torchjd_step() -> None:
                block[0].copy_(aggregator(block))

            times = samples(measure, torchjd_step, repeat, restore)
            result["torchjd"] = {
                "median_s": statistics.median(times),
                "samples": times,
                "relative_error": error(block[0]),
            }
    return result


def _slices(params: list[torch.Tensor]) -> list[slice]:
    out, offset = [], 0
    for q in params:
        out.append(slice(offset, offset + q.numel()))
        offset += q.numel()
    return out


def _peer_cells(result: dict[str, Any], name: str, ours: float) -> tuple[str, str]:
    entry = result.get(name, {})
    if "median_s" not in entry:
        return "—", "—"
    time_cell = f"{1e3 * entry['median_s']:.1f} ms (err {entry['relative_error']:.0e})"
    return time_cell, f"{entry['median_s'] / ours:.1f}×"


def markdown(results: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        f"GEM step on {machine['device_name']} ({machine['date']}, torch {machine['torch']}); "
        "floor: (2t + 3)·p fp32 values at the copy bandwidth measured next to each run",
        "",
        "| p | t | gradsurgery | vs floor | copy GB/s | inner SGD step | published GEM | speed-up "
        "| TorchJD | speed-up | extra memory | transient |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ours = r["gradsurgery"]["median_s"]
        published, published_x = _peer_cells(r, "published", ours)
        torchjd, torchjd_x = _peer_cells(r, "torchjd", ours)
        lines.append(
            f"| {r['p']:.0e} | {r['t']} | {1e3 * ours:.2f} ms | {ours / r['floor_s']:.2f}× | "
            f"{r['copy_bandwidth_GBps']:.1f} | "
            f"{1e3 * r['inner_step']['median_s']:.2f} ms | {published} | {published_x} | "
            f"{torchjd} | {torchjd_x} | {r['extra_memory_bytes'] / 2**20:.0f} MiB (= t·p·4 B) | "
            f"{r['surgery_transient_bytes'] / 2**20:.1f} MiB |"
        )
    return "\n".join(lines) + "\n"


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread" if n == 1 else f"{n} threads"


def machine_info(device: torch.device) -> dict[str, str]:
    """What the figures were measured on, for the results' header."""
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {_threads()}",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "gradsurgery": gradsurgery.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--params", type=float, nargs="+", default=[1e6])
    parser.add_argument("--constraints", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--methods", nargs="+", default=["published", "torchjd"], choices=["published", "torchjd"]
    )
    parser.add_argument(
        "--max-published-bytes",
        type=float,
        default=12e9,
        help="skip the published approach where its copies exceed this",
    )
    parser.add_argument("--out", type=Path, default=None, help="write JSON and Markdown here")
    args = parser.parse_args()

    device = torch.device(args.device)
    machine = machine_info(device)
    results = []
    for p in (int(x) for x in args.params):
        for t in args.constraints:
            methods = set(args.methods)
            if "published" in methods and p * (t + 1) * 16 > args.max_published_bytes:
                methods.discard("published")
            result = run(p, t, device, args.repeat, methods)
            if "published" in args.methods and "published" not in methods:
                result["published"] = {"skipped": "needs more memory than --max-published-bytes"}
            results.append(result)
            print(
                json.dumps(
                    {k: v for k, v in result.items() if k in ("p", "t")}
                    | {
                        k: v.get("median_s", v.get("skipped"))
                        for k, v in result.items()
                        if isinstance(v, dict)
                    }
                ),
                flush=True,
            )
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

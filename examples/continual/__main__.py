"""Continual learning on permuted digits: GEM and A-GEM through GEMProjector, against plain
SGD and the original GEM code's projection.

Ten tasks, each the 8×8 digits of scikit-learn under its own pixel permutation, are
learned one after the other by an MLP (64-100-100-10, SGD 0.1, batch 10, one pass per task,
256 memories per task), as Lopez-Paz & Ranzato (2017) do on MNIST. It reports ACC, BWT
and FWT (their definitions) as mean ± std over seeds, and plots the accuracy on each task
after each task of training.

    python -m examples.continual                    # the full run (a few minutes, 2 cores)
    python -m examples.continual --quick            # a smoke run (seconds)
    python -m examples.continual --out my-results   # where results.json, table.md, accuracy.png go
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from examples.continual.learners import METHODS, Hyper, as_dict, train
from examples.continual.report import metrics, plot, summarise, table
from examples.continual.stream import permuted_digits

ROOT = Path(__file__).resolve().parent.parent.parent
FULL = {"tasks": 10, "train": 1000, "test": 500, "seeds": 10}
QUICK = {"tasks": 3, "train": 600, "test": 300, "seeds": 1}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 tasks of 600 images, one seed")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, help="how many seeds (0, 1, …); default 10, quick 1")
    parser.add_argument("--tasks", type=int, help="default 10 (quick: 3)")
    parser.add_argument("--train", type=int, help="training images per task (default 1000)")
    parser.add_argument("--memories", type=int, default=Hyper.memories, help="per task")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "continual")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    size = dict(QUICK if args.quick else FULL)
    size.update({k: v for k, v in vars(args).items() if k in size and v is not None})
    hyper = Hyper(memories=args.memories)
    start, cpu = time.perf_counter(), time.process_time()
    runs = []
    for seed in range(size["seeds"]):
        tasks = permuted_digits(size["tasks"], size["train"], size["test"], seed)
        for method in args.methods:
            log = as_dict(train(method, tasks, hyper, seed))
            log.update(method=method, seed=seed, metrics=metrics(log["accuracy"], log["baseline"]))
            runs.append(log)
            print(
                f"seed {seed} {method:12s} "
                + "  ".join(f"{k} {v:+.3f}" for k, v in log["metrics"].items()),
                flush=True,
            )
    summary = summarise(runs)
    result = {
        "config": {
            **size,
            **asdict(hyper),
            "quick": args.quick,
            "threads": args.threads,
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
            "torch": torch.__version__,
        },
        "runs": runs,
        "summary": summary,
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }
    text = table(summary)
    print()
    print(text)
    print(f"wall time {result['wall_seconds']:.0f} s, CPU time {result['cpu_seconds']:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "table.md").write_text(text + "\n")
    plot(summary, args.out / "accuracy.png")
    print(f"wrote results.json, table.md and accuracy.png to {args.out}")


if __name__ == "__main__":
    main()

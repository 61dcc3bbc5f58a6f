"""Cross-lingual forgetting in miniature: the rows of Liu et al. (2021)'s Tables 1–2, and more.

A tiny multilingual BERT (``examples/crosslingual/tiny-mbert``, made by
``python -m examples.crosslingual.pretrain``) is fine-tuned to tag the words of synthetic
language ``a`` with their part of speech, by each method of :mod:`.methods`, and scored
zero-shot on languages ``b``, ``c`` and ``d``, on the masked-LM loss of held-out text
(before and after) and on sentence retrieval (XSR P@1). Several seeds; mean ± std.

    python -m examples.crosslingual                 # the full run (minutes on 2 cores)
    python -m examples.crosslingual --quick         # a smoke run (one seed, few steps)
    python -m examples.crosslingual --docs          # the full run, into docs/ (on purpose)

Results go to ``--out`` (``results/crosslingual/``: ``crosslingual.json`` and
``crosslingual.png``); ``--docs`` writes the documentation's copies instead.

With real data (any transformers checkpoint with an MLM head, e.g. mBERT):

    python -m examples.crosslingual --model bert-base-multilingual-cased \\
        --train en=en_ewt-ud-train.conllu --test en=en_ewt-ud-test.conllu \\
        --test fr=fr_gsd-ud-test.conllu --memory en_wiki.txt \\
        --parallel fr=europarl.en,europarl.fr,europarl.en-fr.align

A second ``--train`` language is the extra source of the multi-source rows.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForMaskedLM, AutoModelForTokenClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from examples.crosslingual.bundle import Bundle, from_files, synthetic
from examples.crosslingual.evaluate import memory_scores, scores
from examples.crosslingual.methods import METHODS, MULTI_SOURCE, Hyper, Models, fine_tune
from examples.crosslingual.pretrain import pretrained
from examples.crosslingual.report import plot, summarise, table
from gradsurgery.objectives import share_encoder

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "tiny-mbert"
ROOT = HERE.parent.parent
DOCS_JSON, DOCS_PLOT = (
    ROOT / "docs" / "crosslingual.json",
    ROOT / "docs" / "img" / "crosslingual.png",
)
FULL = {"train": 400, "test": 200, "memory": 1000, "eval": 100, "pairs": 300}
QUICK = {"train": 64, "test": 48, "memory": 64, "eval": 48, "pairs": 32}


def load(path: str | Path, tags: tuple[str, ...], seed: int) -> Models:
    """The tagger (a new linear layer, seeded) and the MLM model sharing its encoder.

    The MLM head's own weights (transform and output bias) stay as pre-trained: the MLM
    loss measures what the shared encoder forgot.
    """
    torch.manual_seed(seed)
    task = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(tags))
    mlm = share_encoder(AutoModelForMaskedLM.from_pretrained(path), task)
    shared = {id(p) for p in task.parameters()}
    for param in mlm.parameters():
        if id(param) not in shared:
            param.requires_grad_(False)
    return Models(task, mlm, AutoTokenizer.from_pretrained(path))


def run(
    model: str | Path,
    bundle: Bundle,
    methods: list[str],
    seeds: list[int],
    hyper: Hyper,
) -> dict[str, Any]:
    """Every method with every seed; the scores of each run and of the pre-trained model."""
    start, cpu = time.perf_counter(), time.process_time()
    pre = memory_scores(load(model, bundle.tags, 0), bundle)
    runs = []
    for method in methods:
        for seed in seeds:
            models = load(model, bundle.tags, seed)
            trace = fine_tune(method, models, bundle, hyper, seed)
            result: dict[str, Any] = {"method": method, "seed": seed, "sources": trace.sources}
            result |= scores(models, bundle)
            result |= {"seconds": trace.seconds, "projected_steps": trace.projected}
            result["memory_batch_deltas"] = trace.memory_deltas
            result["min_dot_after"] = min((min(dots) for dots in trace.dots_after), default=None)
            runs.append(result)
            z = [v for k, v in result["accuracy"].items() if k not in trace.sources]
            print(
                f"{method:>13s} seed {seed}: source {100 * result['accuracy'][bundle.source]:5.1f}"
                f"  zero-shot {100 * sum(z) / len(z):5.1f}"
                f"  MLM {result['mlm_loss'][bundle.source]:.3f}"
                f" (pre-trained {pre['mlm_loss'][bundle.source]:.3f})"
                f"  {trace.seconds:5.1f} s",
                flush=True,
            )
    return {
        "pretrained": pre,
        "runs": runs,
        "summary": summarise(runs, pre, bundle.source),
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except where the help text says it (``None`` and flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=_Help)
    parser.add_argument("--quick", action="store_true", help="one seed, 20 steps, small sets")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="rows to run"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--steps", type=int, help=f"default: {Hyper.steps} (--quick: 20)")
    parser.add_argument("--lr", type=float, default=Hyper.lr, help="learning rate")
    parser.add_argument("--margin", type=float, default=Hyper.margin, help="GEM's margin")
    parser.add_argument(
        "--memory-batch", type=int, default=Hyper.memory_batch, help="memory batch size"
    )
    parser.add_argument(
        "--optimizer", choices=("adamw", "sgd"), default=Hyper.optimizer, help="inner optimizer"
    )
    parser.add_argument("--alpha", type=float, default=Hyper.alpha, help="weight of L_align")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results") / "crosslingual",
        help="directory for crosslingual.json and crosslingual.png",
    )
    parser.add_argument(
        "--docs",
        action="store_true",
        help=f"write {DOCS_JSON.relative_to(ROOT)} and {DOCS_PLOT.relative_to(ROOT)} instead "
        "(the documentation's results: a full run only)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    real = parser.add_argument_group("real data (all of them, or none)")
    real.add_argument("--model", help="a transformers checkpoint with an MLM head")
    real.add_argument("--train", action="append", default=[], metavar="LANG=FILE.conllu")
    real.add_argument("--test", action="append", default=[], metavar="LANG=FILE.conllu")
    real.add_argument("--memory", metavar="FILE", help="memory text, one sentence per line")
    real.add_argument("--parallel", action="append", default=[], metavar="LANG=SRC,TGT[,ALIGN]")
    args = parser.parse_args()
    partial = args.quick or args.seeds or args.steps or args.methods != list(METHODS)
    if args.docs and (partial or args.model or args.train):
        parser.error(
            "--docs regenerates the documentation's full run on the shipped model: "
            "drop --quick, --seeds, --steps, --methods and the real-data options"
        )
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hyper = Hyper(
        lr=args.lr,
        optimizer=args.optimizer,
        margin=args.margin,
        memory_batch=args.memory_batch,
        alpha=args.alpha,
    )
    hyper = replace(hyper, steps=args.steps or (20 if args.quick else hyper.steps))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    real = [args.train, args.test, args.memory, args.parallel]
    if any(real):
        if not all(real):
            raise SystemExit("real data needs --train, --test, --memory and --parallel")
        bundle = from_files(args.train, args.test, args.memory, args.parallel)
        model: str | Path = args.model or SHIPPED
    else:
        bundle = synthetic(QUICK if args.quick else FULL)
        model = args.model or (SHIPPED if (SHIPPED / "config.json").is_file() else pretrained())
    methods = [m for m in args.methods if m not in MULTI_SOURCE or len(bundle.train) > 1]
    if methods != args.methods:
        print(
            f"left out {sorted(set(args.methods) - set(methods))}: they need two --train languages"
        )
    result = run(model, bundle, methods, seeds, hyper)
    result["config"] = {
        "model": str(model if model != SHIPPED else SHIPPED.relative_to(ROOT)),
        "source": bundle.source,
        "sources_of_multi_source_rows": list(bundle.train)[:2],
        "seeds": seeds,
        "quick": args.quick,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        **asdict(hyper),
    }
    print()
    print(table(result["summary"], result["pretrained"], bundle.source))
    print("\n* also a source language of the multi-source rows")
    print(f"wall time {result['wall_seconds']:.0f} s, CPU time {result['cpu_seconds']:.0f} s")
    if args.docs:
        json_path, plot_path = DOCS_JSON, DOCS_PLOT
    else:
        json_path, plot_path = args.out / "crosslingual.json", args.out / "crosslingual.png"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    plot(result["summary"], result["pretrained"], bundle.source, plot_path)
    print(f"wrote {json_path} and {plot_path}")


if __name__ == "__main__":
    main()

"""PhasedLR demo: fine-tune a tiny 12-layer BERT slow and fast, and plot what it did.

A 12-layer BERT with 32-dimensional states is built from a config (no download) and
briefly trained to tag each token with its id modulo 5 (standing in for the pre-trained
checkpoint a real run would start from). It is then fine-tuned with ``PhasedLR(AdamW)``
under a warm-up/linear-decay schedule on another tagging task: a token's tag is its
vocabulary bucket (learnt fast, from the token alone), shifted by one when the sequence's
first token is in the upper half of the vocabulary (learnt later, through attention). A
CKA monitor compares the last two layers' states with the pre-trained model's on the
current batch and decides when policy IV's ``c2`` applies.

The script prints the layer sets, what PhasedLR did every few steps (phase, φ, R(φ), the
four multipliers, the similarity) and saves a plot of it all:

    python examples/phased_lr.py            # about 35 s on two CPU cores

The windows are shorter than the paper's (``--window 25`` instead of 100 steps) to fit a
run of a few hundred steps.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from transformers import BertConfig, BertForTokenClassification

from gradsurgery import CKAMonitor, Phase, PhasedLR, PhasedStats
from gradsurgery.layers import SetName

VOCAB, TAGS, TOKENS, BATCH = 100, 5, 16, 16
ROLES: tuple[SetName, ...] = ("S_I", "S_II", "V_I", "V_II")


def tiny_bert(seed: int) -> BertForTokenClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        num_hidden_layers=12,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=VOCAB,
        max_position_embeddings=TOKENS,
    )
    config.num_labels = TAGS
    return BertForTokenClassification(config)


def batches(seed: int) -> Iterator[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(VOCAB, (BATCH, TOKENS), generator=generator)


def fine_tuning_tags(tokens: Tensor) -> Tensor:
    first_high = (tokens[:, :1] >= VOCAB // 2).long()
    return (tokens * TAGS // VOCAB + first_high) % TAGS


def pretrain(model: BertForTokenClassification, steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for tokens in itertools.islice(batches(seed=12345), steps):
        opt.zero_grad()
        model(input_ids=tokens, labels=tokens % TAGS).loss.backward()
        opt.step()


def fine_tune(
    steps: int, window: int, every: int, seed: int, pretrain_steps: int
) -> list[tuple[float, PhasedStats]]:
    model = tiny_bert(seed)
    pretrain(model, pretrain_steps)
    pretrained = copy.deepcopy(model).eval().requires_grad_(False)
    monitor = CKAMonitor(window=10)
    opt = PhasedLR(
        torch.optim.AdamW(model.parameters(), lr=5e-4), model, window=window, similarity=monitor
    )
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min((step + 1) / warmup, 1.0) * (1 - step / steps)
    )
    last_layers = [index + 1 for index in opt.sets.split.fast]  # hidden_states[0]: embeddings
    print(opt.sets, end="\n\n")
    header = "  ".join(f"{'K ' + role:>7s}" for role in ROLES)
    print(f"{'step':>5s}  {'loss':>6s}  phase  {'φ':>6s}  {'R(φ)':>6s}  {header}  {'CKA':>6s}  c2")

    history = []
    for step, tokens in enumerate(itertools.islice(batches(seed), steps), start=1):
        opt.zero_grad()
        out = model(input_ids=tokens, labels=fine_tuning_tags(tokens), output_hidden_states=True)
        out.loss.backward()
        opt.observe(out.loss)
        if step % 5 == 0:  # the pre-trained model's forward pass costs; every 5 steps is enough
            with torch.no_grad():
                before = pretrained(input_ids=tokens, output_hidden_states=True).hidden_states
            monitor.observe(
                [out.hidden_states[i].detach() for i in last_layers],
                [before[i] for i in last_layers],
            )
        opt.step()
        scheduler.step()
        stats = opt.last_stats
        assert stats is not None
        history.append((out.loss.item(), stats))
        if step % every == 0 or step == steps:
            print(row(step, *history[-1]))
    return history


def row(step: int, loss: float, stats: PhasedStats) -> str:
    def number(value: float | None) -> str:
        return f"{'-':>6s}" if value is None else f"{value:6.3f}"

    multipliers = "  ".join(f"{stats.multipliers[role]:7.3g}" for role in ROLES)
    return (
        f"{step:5d}  {loss:6.3f}  {stats.phase.name:>5s}  {number(stats.ratio)}  "
        f"{number(stats.adaptive_multiplier)}  {multipliers}  {number(stats.similarity)}  "
        f"{'yes' if stats.c2_applied else 'no'}"
    )


def phase_spans(phases: list[Phase]) -> Iterator[tuple[int, int]]:
    """``(first, last)`` step of every run of P1."""
    start = None
    for step, phase in enumerate([*phases, Phase.P2], start=1):
        if phase is Phase.P1 and start is None:
            start = step
        elif phase is Phase.P2 and start is not None:
            yield start, step - 1
            start = None


def plot(history: list[tuple[float, PhasedStats]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(history) + 1)
    losses = [loss for loss, _ in history]
    stats = [s for _, s in history]

    def series(values: list[float | None]) -> list[float]:
        return [math.nan if value is None else value for value in values]

    figure, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True, constrained_layout=True)
    for axis in axes:
        for first, last in phase_spans([s.phase for s in stats]):
            axis.axvspan(first - 0.5, last + 0.5, color="tab:orange", alpha=0.12, lw=0)
        axis.grid(alpha=0.3)
    axes[0].plot(steps, losses, lw=0.8, color="black")
    axes[0].set_ylabel("training loss")
    axes[0].set_title("PhasedLR on a tiny 12-layer BERT (shaded: phase P1)")
    axes[1].plot(steps, series([s.ratio for s in stats]), label="φ = L̄_a / L̄_b")
    axes[1].plot(
        steps, series([s.adaptive_multiplier for s in stats]), label="R(φ) = max(1 − φ³, 0)"
    )
    axes[1].set_ylim(-0.05, 1.25)
    axes[1].legend(loc="upper right", fontsize=8)
    styles: dict[SetName, tuple[str, str]] = {
        "S_I": ("tab:blue", "-"),
        "S_II": ("tab:cyan", "--"),
        "V_I": ("tab:green", ":"),
        "V_II": ("tab:red", "-."),
    }
    for role, (color, style) in styles.items():
        k = [s.multipliers[role] for s in stats]
        axes[2].step(steps, k, style, color=color, where="mid", label=f"K of {role}")
    axes[2].set_yscale("symlog", linthresh=0.01)  # R(φ) reaches 0
    axes[2].set_ylabel("multiplier K")
    axes[2].legend(loc="upper left", fontsize=8, ncol=4)
    axes[2].set_ylim(0, 40)
    axes[3].plot(
        steps,
        series([s.similarity for s in stats]),
        color="tab:purple",
        label="linear CKA, layers 10–11",
    )
    applied = [step for step, s in zip(steps, stats, strict=True) if s.c2_applied]
    axes[3].plot(applied, [-0.04] * len(applied), "|", color="tab:red", ms=4, label="c2 applied")
    axes[3].set_ylim(-0.08, 1.05)
    axes[3].legend(loc="upper right", fontsize=8)
    axes[3].set_ylabel("similarity to the\npre-trained model")
    axes[3].set_xlabel("step")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=500, help="fine-tuning steps")
    parser.add_argument("--window", type=int, default=25, help="W of the phase detector")
    parser.add_argument("--every", type=int, default=25, help="print every this many steps")
    parser.add_argument("--pretrain-steps", type=int, default=100, help="steps of pre-training")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path("results/phased_lr.png"),
        help="where the plot goes (docs/img/phased_lr.png is the documentation's)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    start = time.perf_counter()
    history = fine_tune(args.steps, args.window, args.every, args.seed, args.pretrain_steps)
    seconds = time.perf_counter() - start
    runs = ", ".join(f"{a}–{b}" for a, b in phase_spans([s.phase for _, s in history]))
    in_p2 = [stats for _, stats in history if stats.phase is Phase.P2]
    print(f"\nP1 (S_I at c1 = 0.01) in steps {runs or 'none'}", end="; ")
    print(f"P2 in {len(in_p2)} of {len(history)} steps")
    if in_p2:
        applied = sum(stats.c2_applied for stats in in_p2)
        print(f"c2 = 10 applied in {applied} of the {len(in_p2)} P2 steps (while the CKA dropped)")
    print(f"loss {history[0][0]:.3f} → {history[-1][0]:.3f} in {seconds:.1f} s")
    plot(history, args.plot)
    print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()

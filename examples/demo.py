"""gradsurgery demo: fine-tune a pre-trained network without forgetting what it knew.

A network with a shared trunk is first trained on two "memory" tasks (standing in for
pre-training), then fine-tuned on a new task three ways: plainly, with ``GEMProjector``
(each step's gradient is projected so that neither memory loss increases to first order)
and with A-GEM (only their average may not increase). The GEM run prints what the wrapper
did; a summary compares how much of the memory tasks each run forgot.

    python examples/demo.py            # 10-30 s with one thread on a busy 2-core CPU

It runs on one torch thread by default (``--threads``): the network is small, and more
threads than free cores make it several times slower on a shared machine.

Fine-tuning uses plain SGD, whose step is the (projected) gradient itself, so GEM's
first-order guarantee carries over to the step; with Adam or momentum the update is a
transformation of past projected gradients, which GEM does not constrain.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from gradsurgery import GEMProjector

FEATURES, HIDDEN, OUTPUTS = 16, 64, 4
MEMORIES = ("memory_a", "memory_b")
Data = tuple[Tensor, Tensor]


class MultiHead(nn.Module):
    """A shared trunk with one output head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU()
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(HIDDEN, OUTPUTS) for name in (*MEMORIES, "task")}
        )

    def forward(self, x: Tensor, head: str) -> Tensor:
        out: Tensor = self.heads[head](self.trunk(x))
        return out


def make_task(seed: int, samples: int = 2048) -> Data:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, FEATURES, generator=generator)
    w = torch.randn(FEATURES, OUTPUTS, generator=generator)
    return x, torch.tanh(x @ w)


def batches(data: Data, size: int, seed: int) -> Iterator[Data]:
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    while True:
        index = torch.randint(len(x), (size,), generator=generator)
        yield x[index], y[index]


def loss(model: MultiHead, batch: Data, head: str) -> Tensor:
    return nn.functional.mse_loss(model(batch[0], head), batch[1])


def evaluate(model: MultiHead, tasks: dict[str, Data]) -> dict[str, float]:
    with torch.no_grad():
        return {head: float(loss(model, data, head)) for head, data in tasks.items()}


def pretrain(tasks: dict[str, Data], steps: int = 800) -> MultiHead:
    torch.manual_seed(0)
    model = MultiHead()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    streams = {head: batches(tasks[head], 128, seed=k) for k, head in enumerate(MEMORIES)}
    for _ in range(steps):
        opt.zero_grad()
        sum(loss(model, next(streams[head]), head) for head in MEMORIES).backward()  # type: ignore[union-attr]
        opt.step()
    return model


def fine_tune(
    model: MultiHead,
    opt: torch.optim.Optimizer,
    tasks: dict[str, Data],
    steps: int,
    verbose: bool,
) -> float:
    """Fine-tune on the new task; return the fraction of steps whose gradient was projected."""
    task_stream = batches(tasks["task"], 64, seed=7)
    memory_streams = {
        head: batches(tasks[head], 128, seed=8 + k) for k, head in enumerate(MEMORIES)
    }
    projected = 0
    if verbose:
        print(
            "  g: the new task's gradient; g_a, g_b: the memory gradients; x: the gradient\n"
            "  stepped. A negative <g, g_a>: the step would increase memory_a's loss (to first\n"
            "  order).\n"
            f"  {'step':>6s}  {'<g, g_a>':>9s} {'<g, g_b>':>9s}  projected  "
            f"{'<x, g_a>':>9s} {'<x, g_b>':>9s}"
        )
    for step in range(steps):
        opt.zero_grad()
        loss(model, next(task_stream), "task").backward()
        if isinstance(opt, GEMProjector):
            for head in MEMORIES:
                with opt.constraint(head):  # this backward lands in the constraint's row
                    loss(model, next(memory_streams[head]), head).backward()
        opt.step()
        if isinstance(opt, GEMProjector) and opt.last_stats is not None:
            stats = opt.last_stats.to_dict()
            projected += int(stats["gem/projected"])
            if verbose and step % max(1, steps // 6) == 0:
                before = " ".join(f"{stats[f'gem/dot/{h}']:+9.1e}" for h in MEMORIES)
                after = " ".join(f"{stats[f'gem/dot_after/{h}']:+9.1e}" for h in MEMORIES)
                done = "yes" if stats["gem/projected"] else "no"
                print(f"  {step:6d}  {before}  {done:>9s}  {after}")
    return projected / steps


OUTCOME = """
GEM keeps each memory gradient's dot product with the step non-negative, so no memory loss
increases to first order on the step's memory batches; the memory losses still rise a
little over 400 steps, through the curvature of the losses and because each step sees a
batch, not the whole memory. A-GEM constrains only the average memory gradient: one memory
may get worse while the other improves (a negative <x, g_a> or <x, g_b> above), so it
forgets more than GEM; in exchange it leaves the new task's gradient freer and learns the
new task a little better, with one constraint instead of two."""


def describe(opt: torch.optim.Optimizer) -> str:
    """The optimizer's settings on one line (``print(opt)`` shows them all)."""
    inner = opt.optimizer if isinstance(opt, GEMProjector) else opt
    base = f"{type(inner).__name__}(lr={inner.param_groups[0]['lr']})"
    if not isinstance(opt, GEMProjector):
        return base
    return (
        f"GEMProjector({base}, constraints={list(opt.row_names)}, mode={opt.mode!r}, "
        f"margin={opt.margin})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tasks = {"memory_a": make_task(1), "memory_b": make_task(2), "task": make_task(3)}
    pretrained = pretrain(tasks)
    start = evaluate(pretrained, tasks)

    def sgd(model: MultiHead) -> torch.optim.Optimizer:
        params = [*model.trunk.parameters(), *model.heads["task"].parameters()]
        return torch.optim.SGD(params, lr=0.05)

    runs: dict[str, Callable[[MultiHead], torch.optim.Optimizer]] = {
        "plain fine-tuning": sgd,
        "GEM": lambda m: GEMProjector(sgd(m), constraints=MEMORIES),
        "A-GEM": lambda m: GEMProjector(sgd(m), constraints=MEMORIES, mode="agem"),
    }
    results = {}
    for name, make_optimizer in runs.items():
        model = copy.deepcopy(pretrained)
        opt = make_optimizer(model)
        print(f"\n== {name}: {describe(opt)}")
        share = fine_tune(model, opt, tasks, args.steps, verbose=name != "plain fine-tuning")
        results[name] = evaluate(model, tasks)
        if isinstance(opt, GEMProjector):
            print(f"  the gradient was projected in {100 * share:.0f}% of the steps")

    print("\nlosses after fine-tuning (memory columns: the loss, its change since pre-training)")
    print(f"{'run':20s} {'new task':>10s} {'memory_a':>18s} {'memory_b':>18s}")
    print(f"{'pre-trained':20s} {start['task']:10.4f}", end="")
    print("".join(f" {start[h]:10.4f} {'':7s}" for h in MEMORIES))
    for name, result in results.items():
        print(f"{name:20s} {result['task']:10.4f}", end="")
        print("".join(f" {result[h]:10.4f} {result[h] - start[h]:+7.4f}" for h in MEMORIES))
    print(OUTCOME)


if __name__ == "__main__":
    main()

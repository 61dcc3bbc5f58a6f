"""The learners compared on the stream, each a plain training loop over the tasks.

* ``sgd``: plain SGD, no memory.
* ``gem``: :class:`~gradsurgery.GEMProjector` with its default margin (0.5), one
  constraint per finished task (``add_constraint`` at each task boundary) fed with that
  task's whole episodic memory, as Lopez-Paz & Ranzato (2017) do.
* ``gem-margin0``: the same with ``margin=0``, the exact Euclidean projection.
* ``agem``: A-GEM as Chaudhry et al. (2019) run it: one constraint, fed with one batch
  drawn at random across the memories of every finished task (``mode="agem"``: no margin).
* ``original``: the reference learner, GEM as the authors' code
  (facebookresearch/GradientEpisodicMemory, ``model/gem.py``) computes it, re-written
  here: per-task memory gradients flattened, and when one conflicts with the step's
  gradient, the dual QP solved by quadprog with the absolute ridge ``1e-3·I`` and the
  margin 0.5, then plain SGD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import quadprog
import torch
from torch import Tensor, nn

from examples.continual.stream import Task
from gradsurgery import GEMProjector
from gradsurgery.episodic import RingMemory
from gradsurgery.wrappers.gem import GEM_MARGIN

__all__ = ["METHODS", "Hyper", "train"]

METHODS = ("sgd", "gem", "gem-margin0", "agem", "original")


@dataclass(frozen=True)
class Hyper:
    """The setting of Lopez-Paz & Ranzato (2017)'s MNIST experiments, scaled to 8×8 digits."""

    lr: float = 0.1
    batch: int = 10
    memories: int = 256  # per task
    agem_batch: int = 256  # A-GEM's reference batch (its code's EPS_MEM_BATCH_SIZE)
    hidden: int = 100
    margin: float = 0.5  # the original code's memory strength
    ridge: float = 1e-3  # the original code's absolute ridge


@dataclass
class Log:
    """What a run measured: ``accuracy[i][j]`` on task ``j`` after training task ``i``."""

    baseline: list[float] = field(default_factory=list)
    accuracy: list[list[float]] = field(default_factory=list)
    steps: int = 0
    projected: int = 0
    worst_dot_after: float = 0.0  # min over steps and constraints of ⟨x, g_k⟩ / (‖x‖‖g_k‖)


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def accuracies(model: nn.Module, tasks: list[Task]) -> list[float]:
    return [float((model(t.x_test).argmax(1) == t.y_test).float().mean()) for t in tasks]


def collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def train(method: str, tasks: list[Task], hyper: Hyper, seed: int) -> Log:
    """Train a fresh model on the tasks in order, one pass over each, with ``method``."""
    torch.manual_seed(seed)
    model = mlp(hyper.hidden)
    sgd = torch.optim.SGD(model.parameters(), lr=hyper.lr)
    opt: torch.optim.Optimizer = sgd
    if method in ("gem", "gem-margin0"):
        opt = GEMProjector(sgd, GEM_MARGIN if method == "gem" else 0.0, constraints=0)
    elif method == "agem":
        opt = GEMProjector(sgd, mode="agem", constraints=0)
    elif method not in ("sgd", "original"):
        raise ValueError(f"unknown method {method!r}; the methods are {METHODS}")
    memory: RingMemory[tuple[Tensor, Tensor]] = RingMemory(hyper.memories, seed=seed)
    log = Log(baseline=accuracies(model, tasks))
    for t, task in enumerate(tasks):
        for start in range(0, len(task.y_train), hyper.batch):
            x, y = (
                task.x_train[start : start + hyper.batch],
                task.y_train[start : start + hyper.batch],
            )
            opt.zero_grad()
            loss(model, x, y).backward()
            if method == "original":
                _original_projection(model, memory, hyper, log)
            elif isinstance(opt, GEMProjector) and opt.row_names:
                for name in opt.row_names:
                    with opt.constraint(name):
                        batch = (
                            memory.sample(hyper.agem_batch)
                            if method == "agem"
                            else memory.items(int(name))
                        )
                        loss(model, *collate(batch)).backward()
                _record(opt, log)
            opt.step()
            log.steps += 1
        memory.add(t, list(zip(task.x_train, task.y_train, strict=True)))
        if isinstance(opt, GEMProjector) and (method != "agem" or not opt.row_names):
            opt.add_constraint("memory" if method == "agem" else str(t))
        log.accuracy.append(accuracies(model, tasks))
    return log


def _record(opt: GEMProjector, log: Log) -> None:
    stats = opt.apply_surgery()
    log.projected += int(stats.projected)
    norms = stats.gram.diagonal()[1:].clamp(min=0).sqrt() * stats.projected_norm
    cosines = stats.dots_after / norms.clamp(min=1e-30)
    log.worst_dot_after = min(log.worst_dot_after, float(cosines.min()))


def _original_projection(
    model: nn.Module, memory: RingMemory[tuple[Tensor, Tensor]], hyper: Hyper, log: Log
) -> None:
    """The step's gradient projected as the GEM authors' code does (re-written)."""
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    g = torch.cat([d.flatten() for d in grads]).double().numpy()
    if not memory.tasks:
        return
    rows = []
    for past in memory.tasks:
        memory_grads = torch.autograd.grad(loss(model, *collate(memory.items(past))), params)
        rows.append(torch.cat([d.flatten() for d in memory_grads]).double().numpy())
    M = np.stack(rows)
    if not (M @ g < 0).any():
        return
    K = M @ M.T
    K = 0.5 * (K + K.T) + hyper.ridge * np.eye(len(rows))
    v = quadprog.solve_qp(K, -(M @ g), np.eye(len(rows)), np.full(len(rows), hyper.margin))[0]
    x = M.T @ v + g
    log.projected += 1
    dots = M @ x / np.maximum(np.linalg.norm(M, axis=1) * np.linalg.norm(x), 1e-30)
    log.worst_dot_after = min(log.worst_dot_after, float(dots.min()))
    flat = torch.from_numpy(x).float()
    offset = 0
    for d in grads:
        d.copy_(flat[offset : offset + d.numel()].view_as(d))
        offset += d.numel()


def as_dict(log: Log) -> dict[str, Any]:
    return {
        "baseline": log.baseline,
        "accuracy": log.accuracy,
        "steps": log.steps,
        "projected": log.projected,
        "worst_cosine_after": log.worst_dot_after,
    }

"""LF-MLF in two dimensions: the idea of Figure 1 of Mao et al. (2022), computed.

Two "languages" have quadratic losses of ``θ ∈ R²`` with different minima and
proportional Hessians (``L2`` is 1.5 times steeper than ``L1``), so that the Pareto set,
where no step lowers both losses, is the segment between the minima. Fine-tuning starts from
the pre-trained ``θ_p``, off that segment. Every method is the library's wrapper around
plain SGD on one ``nn.Parameter`` of shape ``(2,)``:

* ``Uniform`` steps on the mean gradient; it ends at the minimiser of ``L1 + L2``,
  wherever ``θ_p`` was;
* ``ParetoLessForgetting`` (LF-MLF) steps on the common descent direction that keeps the
  sum of all steps shortest; with plain SGD ``θ_k = θ_p − η ḡ_k``, so that is the step
  that keeps ``θ`` closest to ``θ_p``;
* ``PCGrad`` (sum) and ``MGDA`` for comparison.

The script prints, per method, the final distance ``‖θ_K − θ_p‖`` (the paper's proxy of
forgetting), the largest distance along the way, the path length, the distance to the
Pareto set and the Pareto-stationarity gap (the norm of the min-norm point of the two
gradients' convex hull, relative to the larger gradient norm); it says when a method does
not behave as the paper's figure suggests, and saves the picture.

LF-MLF is greedy: each step is the closest one to ``θ_p`` among common descent directions,
which is not a projection onto the Pareto set. From a start above Uniform's end point,
Uniform walks almost straight to the nearest Pareto point and LF-MLF can end farther;
``--starts N`` repeats the comparison from ``N`` random ``θ_p`` and counts how often.

    python examples/lfmlf_toy.py                # about 10 s on 2 CPU cores, half of it imports
    python examples/lfmlf_toy.py --starts 50    # and 50 random θ_p (about 2 minutes)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from gradsurgery import MGDA, MultiObjectiveOptimizer, ParetoLessForgetting, PCGrad, Uniform
from gradsurgery.simplex_qp import min_norm_weights

F64 = torch.float64
MINIMA = {"L1": torch.tensor([-1.0, 0.0], dtype=F64), "L2": torch.tensor([1.0, 0.0], dtype=F64)}
SCALE = {"L1": 1.0, "L2": 1.5}
ANGLE, CONDITION = 0.6, 5.0  # the Hessians' principal axis and condition number
THETA_P = torch.tensor([-1.6, 1.4], dtype=F64)
LR = 0.06
STATIONARY = 1e-3  # relative gap below which the table calls a point Pareto-stationary

_rotation = torch.tensor(
    [[math.cos(ANGLE), -math.sin(ANGLE)], [math.sin(ANGLE), math.cos(ANGLE)]], dtype=F64
)
HESSIAN = _rotation @ torch.diag(torch.tensor([1.0, CONDITION], dtype=F64)) @ _rotation.T

Factory = Callable[[torch.optim.Optimizer], MultiObjectiveOptimizer]
METHODS: dict[str, Factory] = {
    "Uniform": lambda sgd: Uniform(sgd, objectives=list(MINIMA)),
    "LF-MLF": lambda sgd: ParetoLessForgetting(sgd, objectives=list(MINIMA)),
    "PCGrad": lambda sgd: PCGrad(
        sgd, objectives=list(MINIMA), generator=torch.Generator().manual_seed(0)
    ),
    "MGDA": lambda sgd: MGDA(sgd, objectives=list(MINIMA)),
}
STYLE = {
    "Uniform": ("tab:blue", "-"),
    "LF-MLF": ("tab:red", "-"),
    "PCGrad": ("tab:green", "--"),
    "MGDA": ("tab:purple", ":"),
}


def losses(theta: Tensor) -> dict[str, Tensor]:
    out = {}
    for name, minimum in MINIMA.items():
        delta = theta - minimum
        out[name] = 0.5 * SCALE[name] * delta @ HESSIAN @ delta
    return out


def stationarity_gap(theta: Tensor) -> float:
    """``‖Jᵀw*‖ / max_t ‖g_t‖`` with ``w*`` the min-norm point: 0 exactly on the Pareto set."""
    point = theta.detach().requires_grad_()
    J = torch.stack([torch.autograd.grad(loss, point)[0] for loss in losses(point).values()])
    K = J @ J.T
    w = min_norm_weights(K).w
    largest = float(K.diagonal().max().sqrt())
    return float((w @ K @ w).clamp(min=0).sqrt()) / largest if largest > 0 else 0.0


def distance_to_pareto_set(theta: Tensor) -> float:
    """Distance to the segment between the minima (the Pareto set of these losses)."""
    a, b = MINIMA["L1"], MINIMA["L2"]
    s = float(((theta - a) @ (b - a) / (b - a).square().sum()).clamp(0, 1))
    return float((theta - a - s * (b - a)).norm())


@dataclass
class Run:
    """One method's trajectory ``θ_0 = θ_p, θ_1, …, θ_K`` and what the wrapper reported."""

    path: Tensor
    skipped: int
    accumulated: Tensor | None

    @property
    def distances(self) -> Tensor:
        return (self.path - self.path[0]).square().sum(dim=1).sqrt()

    @property
    def length(self) -> float:
        return float(self.path.diff(dim=0).norm(dim=1).sum())

    @cached_property
    def gaps(self) -> list[float]:
        return [stationarity_gap(theta) for theta in self.path]


def fine_tune(method: str, theta_p: Tensor, steps: int) -> Run:
    theta = torch.nn.Parameter(theta_p.clone())
    opt = METHODS[method](torch.optim.SGD([theta], lr=LR))
    path, skipped = [theta_p.clone()], 0
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(losses(theta))
        opt.step()
        assert opt.last_stats is not None
        skipped += opt.last_stats.skipped
        path.append(theta.detach().clone())
    accumulated = opt.accumulated() if isinstance(opt, ParetoLessForgetting) else None
    return Run(torch.stack(path), skipped, accumulated)


def report(runs: dict[str, Run]) -> None:
    print(
        f"{'method':8s} {'final θ':>16s} {'‖θ_K − θ_p‖':>12s} {'max ‖θ_k − θ_p‖':>16s} "
        f"{'path':>7s} {'to Pareto set':>14s} {'stat. gap':>10s} {'skipped':>8s}"
    )
    for name, run in runs.items():
        final = run.path[-1]
        coords = f"({float(final[0]):+.3f},{float(final[1]):+.3f})"
        print(
            f"{name:8s} {coords:>16s} {float(run.distances[-1]):12.4f} "
            f"{float(run.distances.max()):16.4f} {run.length:7.4f} "
            f"{distance_to_pareto_set(final):14.1e} {run.gaps[-1]:10.1e} "
            f"{run.skipped:8d}"
        )
    lf, uniform = runs["LF-MLF"], runs["Uniform"]
    nearest = distance_to_pareto_set(lf.path[0])
    print(f"\nthe Pareto set's point nearest to θ_p is at distance {nearest:.4f}")
    ratio = float(lf.distances[-1] / uniform.distances[-1])
    verdict = "closer to" if ratio < 1 else "NOT closer to (unlike the paper's figure)"
    print(f"LF-MLF ends {verdict} θ_p than Uniform: distance ratio {ratio:.3f}")
    ratio = float(lf.distances[-1] / runs["MGDA"].distances[-1])
    print(f"LF-MLF / MGDA final distance ratio: {ratio:.3f}")
    for name, run in runs.items():
        if run.gaps[-1] > STATIONARY:
            print(f"{name} has NOT reached a Pareto-stationary point (gap > {STATIONARY:g})")
    if lf.accumulated is not None:
        # With plain SGD, θ_K = θ_p − η·ḡ: LF-MLF's ḡ is the displacement it keeps short.
        displacement = (lf.path[0] - lf.path[-1]) / LR
        error = float((lf.accumulated - displacement).norm() / displacement.norm())
        print(f"LF-MLF's ḡ equals (θ_p − θ_K)/η to {error:.1e} relative")


def plot(runs: dict[str, Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    fig = plt.figure(figsize=(12, 5.6))
    grid = fig.add_gridspec(2, 2, width_ratios=[1.5, 1], hspace=0.35, wspace=0.22)
    ax = fig.add_subplot(grid[:, 0])
    xs, ys = torch.meshgrid(
        torch.linspace(-2.4, 1.9, 240), torch.linspace(-1.0, 2.0, 180), indexing="xy"
    )
    points = torch.stack([xs, ys], dim=-1)
    for (name, minimum), colour in zip(MINIMA.items(), ("0.35", "tab:orange"), strict=True):
        delta = points - minimum
        values = 0.5 * SCALE[name] * torch.einsum("...i,ij,...j->...", delta, HESSIAN, delta)
        ax.contour(xs, ys, values, levels=[0.05, 0.2, 0.5, 1, 2, 4], colors=colour, linewidths=0.7)
        ax.plot(*minimum, "o", color=colour, ms=6)
        ax.annotate(
            f"min {name}", tuple(minimum.tolist()), textcoords="offset points", xytext=(-18, -14)
        )
    segment = torch.stack(list(MINIMA.values()))
    ax.plot(segment[:, 0], segment[:, 1], color="black", lw=4, alpha=0.3, label="Pareto set")
    theta_p = runs["LF-MLF"].path[0]
    radius = float(runs["LF-MLF"].distances[-1])
    ax.add_patch(
        Circle(tuple(theta_p.tolist()), radius, fill=False, ls=":", color="tab:red", lw=0.8)
    )
    for name, run in runs.items():
        colour, style = STYLE[name]
        label = f"{name}: ‖θ_K − θ_p‖ = {float(run.distances[-1]):.3f}"
        ax.plot(run.path[:, 0], run.path[:, 1], style, color=colour, lw=1.8, label=label)
        ax.plot(*run.path[-1], "o", color=colour, ms=5)
    ax.plot(*theta_p, "k*", ms=14, label="θ_p (pre-trained)")
    ax.set(xlabel="θ[0]", ylabel="θ[1]", aspect="equal", xlim=(-2.4, 1.9), ylim=(-1.0, 2.0))
    ax.set_title("SGD through each wrapper (contours: L1 grey, L2 orange)")
    ax.legend(loc="upper right", fontsize=8.5)

    top, bottom = fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 1])
    for name, run in runs.items():
        colour, style = STYLE[name]
        steps = torch.arange(len(run.path))
        top.plot(steps, run.distances, style, color=colour, label=name)
        bottom.semilogy(steps, run.gaps, style, color=colour, label=name)
    lf = runs["LF-MLF"]
    if lf.skipped:
        stop = len(lf.path) - 1 - lf.skipped
        bottom.annotate(
            "LF-MLF: stationary, steps skipped",
            (stop, lf.gaps[stop]),
            textcoords="offset points",
            xytext=(-185, -45),
            color="tab:red",
            fontsize=8.5,
            arrowprops={"arrowstyle": "->", "color": "tab:red"},
        )
    for panel in (top, bottom):
        panel.set_xscale("symlog", linthresh=1)
        panel.set_xlim(0, len(steps))
    top.set(ylabel="‖θ_k − θ_p‖", title="Distance from the pre-trained point")
    bottom.set(
        xlabel="step k",
        ylabel="min-norm / max ‖g_t‖",
        ylim=(1e-8, 2),  # below ~1e-8 the gap is rounding in the Gram matrix
        title="Pareto-stationarity gap (0 on the Pareto set)",
    )
    top.legend(fontsize=8.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)


def random_starts(count: int, steps: int) -> None:
    """Repeat the comparison from ``count`` random ``θ_p``: is the figure's case typical?"""
    generator = torch.Generator().manual_seed(0)
    lows, highs = torch.tensor([-2.5, 0.3], dtype=F64), torch.tensor([2.5, 2.5], dtype=F64)
    ratios: dict[str, list[float]] = {"Uniform": [], "MGDA": []}
    for _ in range(count):
        theta_p = lows + (highs - lows) * torch.rand(2, generator=generator, dtype=F64)
        final = float(fine_tune("LF-MLF", theta_p, steps).distances[-1])
        for other, values in ratios.items():
            values.append(final / float(fine_tune(other, theta_p, steps).distances[-1]))
    print(f"\n{count} random θ_p in [-2.5, 2.5] × [0.3, 2.5], {steps} steps each:")
    for other, values in ratios.items():
        closer = sum(r < 1 for r in values)
        ordered = sorted(values)
        print(
            f"  LF-MLF ends closer to θ_p than {other} in {closer}/{count}; final-distance "
            f"ratio LF-MLF/{other}: min {ordered[0]:.3f}, median "
            f"{ordered[len(ordered) // 2]:.3f}, max {ordered[-1]:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=300, help="SGD steps per method")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/lfmlf_toy.png"),
        help="where the plot goes (docs/img/lfmlf_toy.png is the documentation's)",
    )
    parser.add_argument("--starts", type=int, default=0, help="also compare from N random θ_p")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tensors of 2 values: a thread pool only adds overhead

    runs = {name: fine_tune(name, THETA_P, args.steps) for name in METHODS}
    print(f"θ_p = {THETA_P.tolist()}, SGD lr = {LR}, {args.steps} steps\n")
    report(runs)
    plot(runs, args.out)
    print(f"\nsaved {args.out}")
    if args.starts:
        random_starts(args.starts, args.steps)


if __name__ == "__main__":
    main()

"""What each rank runs in ``tests/test_distributed.py``: models, batches, scenarios.

Every function takes the rank (``None``: one process on the union of the ranks' batches)
and returns what the tests compare: parameters, gradients, the collectives of a step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradsurgery import (
    MGDA,
    GEMProjector,
    GradVac,
    NonFiniteGradientError,
    ParetoLessForgetting,
    PCGrad,
    SurgeryOptimizer,
    Uniform,
)
from gradsurgery.distributed import Replicated, Sharded

WORLD = 2
BATCH = 8
STEPS = 2
T = 3  # objectives; GEM: one task and T - 1 constraints


def build(name: str, opt: torch.optim.Optimizer, layout: Any, seed: int) -> SurgeryOptimizer[Any]:
    gen = torch.Generator().manual_seed(seed)
    if name == "gem":
        return GEMProjector(opt, 0.1, constraints=T - 1, distributed=layout)
    if name == "gem1":
        return GEMProjector(opt, 0.1, constraints=1, distributed=layout)
    if name == "uniform":
        return Uniform(opt, T, distributed=layout)
    if name == "pcgrad":
        return PCGrad(opt, T, generator=gen, distributed=layout)
    if name == "gradvac":
        return GradVac(opt, T, beta=0.5, generator=gen, distributed=layout)
    if name == "gradvac_param":
        return GradVac(opt, T, beta=0.5, granularity="parameter", generator=gen, distributed=layout)
    if name == "mgda":
        return MGDA(opt, T, distributed=layout)
    assert name == "lfmlf"
    return ParetoLessForgetting(opt, T, distributed=layout)


NAMES = ["gem", "uniform", "pcgrad", "gradvac", "gradvac_param", "mgda", "lfmlf"]
MODES = ["ddp", "scatter", "auto", "fsdp"]
SCATTER = {"ddp": False, "scatter": True, "auto": None}  # Replicated(scatter=...)
REFUSED = {("scatter", "gradvac_param")}  # refused at construction (see the test below)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def batch(step: int, rank: int | None) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(T, BATCH, 4, generator=gen, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64).view(T, 1, 1)
    y = signs * x.sum(dim=-1, keepdim=True) + torch.randn(T, BATCH, 1, generator=gen).double()
    if rank is None:
        return x, y
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return x[:, half], y[:, half]


def loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((net(x) - y) ** 2).mean()


def fill_rows(
    name: str,
    net: nn.Module,
    opt: SurgeryOptimizer[Any],
    x: Tensor,
    y: Tensor,
    local: Callable[[], AbstractContextManager[None]],
    poison: int | None = None,
) -> None:
    """One step's backward passes; ``poison`` multiplies that row's loss by NaN."""
    scale = [float("nan") if k == poison else 1.0 for k in range(T)]
    if name.startswith("gem"):
        (scale[0] * loss(net, x[0], y[0])).backward()  # DDP averages .grad itself
        for k in range(1, 1 + len(opt.row_names)):
            with opt.constraint(k - 1), local():  # type: ignore[attr-defined]
                (scale[k] * loss(net, x[k], y[k])).backward()
        return
    for k in range(T):
        with opt.objective(k), local():  # type: ignore[attr-defined]
            (scale[k] * loss(net, x[k], y[k])).backward()


def last_column(net: nn.Module) -> Tensor:
    """A term whose gradient is the last parameter's: the last rank's column shard."""
    return list(net.parameters())[-1].sum()


def full(p: Tensor) -> Tensor:
    return p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()


def train(name: str, mode: str, rank: int | None) -> list[Tensor]:
    """``STEPS`` steps of SGD with momentum under ``name``; the final (full) parameters."""
    model = make_model()
    net: nn.Module = model
    layout: Any = None
    local: Callable[[], AbstractContextManager[None]] = nullcontext
    if mode in SCATTER:
        ddp = nn.parallel.DistributedDataParallel(model)
        net, layout, local = ddp, Replicated(scatter=SCATTER[mode]), ddp.no_sync
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        layout = Sharded()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = build(name, inner, layout, seed=7 + (rank or 0))  # rank 0's generator is broadcast
    for step in range(STEPS):
        x, y = batch(step, rank)  # each rank its half; DDP/FSDP average the halves
        opt.zero_grad()
        fill_rows(name, net, opt, x, y, local)
        opt.step()
    return [full(p) for p in model.parameters()]


COLLECTIVES = ["all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast"]


@contextmanager
def counting_collectives(log: list[tuple[str, int]]) -> Iterator[None]:
    """Record every collective issued inside: its name and the bytes of its whole tensor.

    The whole tensor: what is all-reduced, the row a reduce-scatter splits (its input),
    the row an all-gather fills, what is broadcast.
    """
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name: str) -> Callable[..., Any]:
        def counted(first: Any, *args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if name == "reduce_scatter_tensor" else first  # its input
            log.append((name, tensor.numel() * tensor.element_size()))
            return originals[name](first, *args, **kwargs)

        return counted

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def step_traffic(mode: str, name: str, rank: int) -> list[tuple[str, int]]:
    """The collectives the wrapper issues in one step (not DDP's/FSDP's own), with bytes."""
    model = make_model()
    layout: Any
    local: Callable[[], AbstractContextManager[None]]
    net: nn.Module
    if mode in SCATTER:
        ddp = nn.parallel.DistributedDataParallel(model)
        net, layout, local = ddp, Replicated(scatter=SCATTER[mode]), ddp.no_sync
    else:
        from torch.distributed.fsdp import fully_shard

        net = fully_shard(model)  # type: ignore[assignment]
        layout, local = Sharded(), nullcontext
    opt = build(name, torch.optim.SGD(model.parameters(), lr=0.1), layout, seed=7)
    x, y = batch(0, rank)
    fill_rows(name, net, opt, x, y, local)
    log: list[tuple[str, int]] = []
    with counting_collectives(log):
        opt.step()
    return log


def nan_on_one_rank(rank: int, scatter: bool | None, last_only: bool = False) -> dict[str, Any]:
    """Rank 1 poisons a constraint: both ranks raise, nothing changes, then both go on.

    ``last_only``: under the GradScaler, only the last parameter's gradient is NaN, in the
    last rank's columns: the first rank's own columns of the row stay finite.
    """
    out: dict[str, Any] = {}
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    layout = Replicated(scatter=scatter)
    opt = build("gem", torch.optim.Adam(model.parameters(), lr=0.1), layout, seed=7)
    x, y = batch(0, rank)
    fill_rows("gem", ddp, opt, x, y, ddp.no_sync)
    opt.step()
    before = ([full(p) for p in model.parameters()], copy.deepcopy(opt.state_dict()))
    x, y = batch(1, rank)
    opt.zero_grad()
    fill_rows("gem", ddp, opt, x, y, ddp.no_sync, poison=1 if rank == 1 else None)
    try:
        opt.step()
        out["raised"] = False
    except NonFiniteGradientError:
        out["raised"] = True
    out["unchanged"] = all(
        torch.equal(p, q) for p, q in zip(model.parameters(), before[0], strict=True)
    ) and str(opt.state_dict()) == str(before[1])
    opt.zero_grad()
    fill_rows("gem", ddp, opt, x, y, ddp.no_sync)
    opt.step()
    out["after"] = [full(p) for p in model.parameters()]

    # the same under a GradScaler: both ranks skip and back off identically
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = GEMProjector(
        torch.optim.SGD(model.parameters(), lr=0.1),
        margin=0.0,
        constraints=1,
        grad_scaler=scaler,
        distributed=layout,
    )
    start = [full(p) for p in model.parameters()]
    x, y = batch(0, rank)
    opt.zero_grad()
    scaler.scale(loss(ddp, x[0], y[0])).backward()
    with opt.constraint(), ddp.no_sync():
        poison = float("nan") if rank == 1 else 1.0
        if last_only:
            spoiled = loss(ddp, x[1], y[1]) + (poison - 1.0) * last_column(ddp)
        else:
            spoiled = poison * loss(ddp, x[1], y[1])
        scaler.scale(spoiled).backward()
    scaler.step(opt)
    scaler.update()
    out["scaler_skipped"] = bool(opt.last_stats is not None and opt.last_stats.skipped)
    out["scaler_unchanged"] = all(
        torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True)
    )
    out["scale"] = scaler.get_scale()
    return out


def clipped(rank: int | None, layout: Any) -> dict[str, Any]:
    """LF-MLF and GEM clipped to a norm below their directions' (the norm is global)."""
    out: dict[str, Any] = {}
    for name in ("lfmlf", "gem"):
        model = make_model()
        net: nn.Module = model
        local: Callable[[], AbstractContextManager[None]] = nullcontext
        if layout is not None:
            ddp = nn.parallel.DistributedDataParallel(model)
            net, local = ddp, ddp.no_sync
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        if name == "gem":
            opt: SurgeryOptimizer[Any] = GEMProjector(
                inner, 0.1, constraints=T - 1, distributed=layout, max_grad_norm=0.05
            )
        else:
            opt = ParetoLessForgetting(inner, T, distributed=layout, max_grad_norm=0.05)
        norms = []
        for step in range(STEPS):
            x, y = batch(step, rank)
            opt.zero_grad()
            fill_rows(name, net, opt, x, y, local)
            opt.step()
            assert opt.last_grad_norm is not None
            norms.append(opt.last_grad_norm.double())
        out[name] = [full(p) for p in model.parameters()]
        out[f"{name}/norms"] = norms
        if isinstance(opt, ParetoLessForgetting):
            out["accumulated"] = opt.accumulated().clone()
            out["saved"] = dict(opt.state_dict()["gradsurgery"][-1]["accumulated"])
    return out


def overflow_in_one_rank_columns(rank: int) -> dict[str, Any]:
    """fp16 GEM whose projection is Inf in the first rank's columns only (scatter).

    ``g = (6e4, 6e4, 0)``, ``g_1 = (1, -3, 0)`` project to ``(Inf, 24000, 0)``: only the
    first rank sees the Inf, and both must refuse the step.
    """
    w = nn.Parameter(torch.zeros(3, dtype=torch.float16))
    opt = GEMProjector(
        torch.optim.SGD([w], lr=1.0), 0.0, constraints=1, distributed=Replicated(scatter=True)
    )
    (w * torch.tensor([6e4, 6e4, 0.0], dtype=torch.float16)).sum().backward()  # alike on both
    with opt.constraint():
        (w * torch.tensor([1.0, -3.0, 0.0], dtype=torch.float16)).sum().backward()
    try:
        opt.step()
        raised = ""
    except NonFiniteGradientError as error:
        raised = str(error)
    return {"raised": raised, "unchanged": bool((w == 0).all())}


def tiny(rank: int | None, layout: Any) -> dict[str, Any]:
    """GEM on gradients scaled by 1e-150: the underflow test asks for the exact Gram matrix.

    Returns the projected gradient scaled back, and the collectives of the step.
    """
    model = make_model()
    net: nn.Module = model
    local: Callable[[], AbstractContextManager[None]] = nullcontext
    if layout is not None:
        ddp = nn.parallel.DistributedDataParallel(model)
        net, local = ddp, ddp.no_sync
    opt = GEMProjector(
        torch.optim.SGD(model.parameters(), lr=0.1), 0.1, constraints=T - 1, distributed=layout
    )
    x, y = batch(0, rank)
    (1e-150 * loss(net, x[0], y[0])).backward()
    for k in range(1, T):
        with opt.constraint(k - 1), local():
            (1e-150 * loss(net, x[k], y[k])).backward()
    log: list[tuple[str, int]] = []
    with counting_collectives(log):
        opt.apply_surgery()
    grads = [p.grad for p in model.parameters()]
    return {"grad": [g * 1e150 for g in grads if g is not None], "collectives": log}


def opposite_huge_gradients(rank: int) -> dict[str, Any]:
    """A GradScaler below 1: rank 0's and rank 1's huge gradients cancel in the average.

    The constraint's second entry is ``±1e330`` on ranks 0 and 1 (stored scaled by
    ``2^-100``: finite): its average is 0, while rank 0's own value, unscaled, would not be
    finite. The second column is rank 1's (``p = 3``); only the averaged columns are
    unscaled and read, so both ranks step alike, as one process would.
    """
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-100)
    opt = GEMProjector(
        torch.optim.SGD([w], lr=1.0),
        0.0,
        constraints=1,
        grad_scaler=scaler,
        distributed=Replicated(scatter=True),
    )
    scaler.scale((w * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum()).backward()
    sign = 1.0 if rank == 0 else -1.0
    huge = torch.tensor([0.0, sign * 1e130, 0.0], dtype=torch.float64)
    with opt.constraint():
        scaler.scale(1e200 * (w * huge).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.last_stats is not None
    return {"skipped": opt.last_stats.skipped, "scale": scaler.get_scale(), "w": w.detach()}


def one_column(rank: int | None, layout: Any) -> Tensor:
    """GEM on a one-entry parameter (fewer columns than ranks), tiny gradients: ``.grad``.

    Rank 0 holds no column: its Gram matrix (exact, for the tiny values) is zero.
    """
    w = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = GEMProjector(torch.optim.SGD([w], lr=0.1), 0.0, constraints=T - 1, distributed=layout)
    half = 0.0 if rank is None else float(rank) - 0.5  # the ranks' halves average to 0
    (1e-150 * (w * 3.0).sum()).backward()
    for k in range(1, T):
        with opt.constraint(k - 1):
            (1e-150 * (w * (half - k)).sum()).backward()
    opt.apply_surgery()
    assert w.grad is not None
    return w.grad * 1e150


def _uniform_step(
    opt: Uniform,
    net: nn.Module,
    local: Callable[[], AbstractContextManager[None]],
    fault: str | None,
    step: int,
    rank: int,
) -> str:
    """One step of :func:`uniform_faults` with ``fault`` (``None``: clean); what it raised."""
    x, y = batch(step, rank)
    scaler = opt.grad_scaler
    opt.zero_grad()
    for k in range(T):
        term = loss(net, x[k], y[k])
        if k == 1 and fault in ("nan", "scaler"):
            term = term * float("nan")
        if k == 1 and fault == "nan_last":
            term = term + float("nan") * last_column(net)
        with opt.objective(k), local():
            (term if scaler is None else scaler.scale(term)).backward()
    if fault == "stray":
        with torch.no_grad():
            opt.bank.params[0].grad.add_(1.0)  # type: ignore[union-attr]
    try:
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    except (NonFiniteGradientError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return ""


def uniform_faults(rank: int, mode: str) -> dict[str, Any]:
    """Uniform's Gram-free step with a fault on rank 1 only: every rank decides alike.

    ``nan``: an objective's loss is NaN; ``nan_last``: only the last parameter's gradient
    is (in the last rank's columns or shard); ``stray``: a value written into ``.grad``
    outside every objective (``Replicated(scatter=False)`` decides it per rank, as with
    the Gram matrix: not run there); ``scaler``: ``nan`` under a GradScaler, skipped.
    Each records what the step raised, whether anything changed, and the parameters
    after a clean step that follows.
    """
    out: dict[str, Any] = {}
    faults = ["nan", "nan_last", "scaler"] + ([] if mode == "ddp" else ["stray"])
    for fault in faults:
        model = make_model()
        net: nn.Module = model
        layout: Any
        local: Callable[[], AbstractContextManager[None]] = nullcontext
        if mode in SCATTER:
            ddp = nn.parallel.DistributedDataParallel(model)
            net, layout, local = ddp, Replicated(scatter=SCATTER[mode]), ddp.no_sync
        else:
            from torch.distributed.fsdp import fully_shard

            net, layout = fully_shard(model), Sharded()  # type: ignore[assignment]
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if fault == "scaler" else None
        opt = Uniform(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            T,
            grad_scaler=scaler,
            distributed=layout,
        )
        _uniform_step(opt, net, local, None, 0, rank)
        before = ([full(p) for p in model.parameters()], str(opt.state_dict()))
        raised = _uniform_step(opt, net, local, fault if rank == 1 else None, 1, rank)
        unchanged = (
            all(torch.equal(full(p), q) for p, q in zip(model.parameters(), before[0], strict=True))
            and str(opt.state_dict()) == before[1]
        )
        out[fault] = {
            "raised": raised,
            "unchanged": unchanged,
            "skipped": opt.last_stats is not None and opt.last_stats.skipped,
            "scale": None if scaler is None else scaler.get_scale(),
        }
        _uniform_step(opt, net, local, None, 1, rank)
        out[fault]["after"] = [full(p) for p in model.parameters()]
    return out

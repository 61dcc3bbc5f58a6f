"""Two CPU ranks over gloo: DDP, FSDP2 and single-process runs must take the same steps.

One start of two processes runs every check; each rank saves what it saw and the tests
below compare it with a single process trained on the union of the ranks' batches. The
ranks are forked (as DataLoader workers are), not spawned: re-importing torch in each
would cost more than all the checks together on a loaded two-core machine.
Everything is float64: the distributed runs average the two halves' gradients where the
single process averages over the whole batch, and the sharded runs add two partial Gram
matrices, so the results agree to rounding (1e-12), not bit for bit; across ranks they
must be bit-identical.
"""

from __future__ import annotations

import copy
import itertools
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.multiprocessing.spawn import start_processes

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
from gradsurgery.distributed import Replicated, Sharded, shard_bounds

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


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        for name in NAMES:
            for mode in MODES:
                if (mode, name) not in REFUSED:
                    results[f"{mode}/{name}"] = train(name, mode, rank)
        for mode in MODES:
            for name in ("gem", "mgda", "lfmlf"):
                results[f"traffic/{mode}/{name}"] = step_traffic(mode, name, rank)
        for name in ("gem1", "gradvac_param"):
            results[f"traffic/auto/{name}"] = step_traffic("auto", name, rank)
        results["nan"] = nan_on_one_rank(rank, scatter=False)
        results["nan/auto"] = nan_on_one_rank(rank, scatter=None)
        results["nan/scatter"] = nan_on_one_rank(rank, scatter=True)
        results["nan/scatter/last"] = nan_on_one_rank(rank, scatter=True, last_only=True)
        results["overflow/scatter"] = overflow_in_one_rank_columns(rank)
        results["tiny/scatter"] = tiny(rank, Replicated(scatter=True))
        results["huge/scatter"] = opposite_huge_gradients(rank)
        results["one_column/scatter"] = one_column(rank, Replicated(scatter=True))
        results["clip/scatter"] = clipped(rank, Replicated(scatter=True))
        results["clip/ddp"] = clipped(rank, Replicated(scatter=False))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    out_dir = tmp_path_factory.mktemp("dist")
    start_processes(
        worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True, start_method="fork"
    )
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_close(actual: list[Tensor], expected: list[Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("mode", "name"), [(m, n) for m in MODES for n in NAMES if (m, n) not in REFUSED]
)
def test_every_rank_takes_the_single_process_step(ranks, mode, name):
    single = train(name, "single", None)
    for r in range(WORLD):
        assert_close(ranks[r][f"{mode}/{name}"], single)
    # the ranks agree bit for bit, and the steps moved the parameters
    for p, q in zip(ranks[0][f"{mode}/{name}"], ranks[1][f"{mode}/{name}"], strict=True):
        assert torch.equal(p, q)
    assert not all(
        torch.equal(p, q) for p, q in zip(single, make_model().parameters(), strict=True)
    )


def test_the_collectives_of_a_step(ranks):
    p = sum(q.numel() for q in make_model().parameters())
    assert p % WORLD != 0  # the last rank's extra column is broadcast
    even = p // WORLD * WORLD
    for r in range(WORLD):
        # DDP: the T - 1 constraint rows (GEM) or the T objective rows, in one all-reduce
        assert ranks[r]["traffic/ddp/gem"] == [("all_reduce", (T - 1) * p * 8)]
        assert ranks[r]["traffic/ddp/mgda"] == [("all_reduce", T * p * 8)]
        assert ranks[r]["traffic/ddp/lfmlf"] == [("all_reduce", T * p * 8)]
        # FSDP: the (rows x rows) Gram only; GEM's has the task row too
        assert ranks[r]["traffic/fsdp/gem"] == [("all_reduce", T * T * 8)]
        assert ranks[r]["traffic/fsdp/mgda"] == [("all_reduce", (T + 1) ** 2 * 8)]
        assert ranks[r]["traffic/fsdp/lfmlf"] == [("all_reduce", (T + 2) ** 2 * 8)]
        # DDP, scatter: one reduce-scatter per extra row, the Gram, the p-sized result
        gather = [("all_gather_into_tensor", even * 8), ("broadcast", (p - even) * 8)]
        for name, rows, gram in [("gem", T - 1, T), ("mgda", T, T + 1), ("lfmlf", T, T + 2)]:
            expected = [("reduce_scatter_tensor", even * 8)] * rows  # each row, in place
            expected += [("all_reduce", rows * (p - even) * 8)]  # the rows' 31st columns
            expected += [("all_reduce", gram * gram * 8)]
            assert ranks[r][f"traffic/scatter/{name}"] == expected + gather
            # (t + 1) p values of rows against 2 t p for the all-reduce (in a ring, each
            # times (W - 1) / W): the same for t = 1, 3/4 for t = 2
            moved = sum(size for kind, size in ranks[r][f"traffic/scatter/{name}"])
            assert moved == (rows + 1) * p * 8 + gram * gram * 8
            # Replicated(): the reduce-scatter from two averaged rows on
            assert ranks[r][f"traffic/auto/{name}"] == expected + gather
        # ... one all-reduce for one row (2p values either way, one collective instead of
        # three), and for per-parameter GradVac, which cannot run on a rank's columns
        assert ranks[r]["traffic/auto/gem1"] == [("all_reduce", p * 8)]
        assert ranks[r]["traffic/auto/gradvac_param"] == [("all_reduce", T * p * 8)]


@pytest.mark.parametrize("key", ["nan", "nan/scatter", "nan/scatter/last", "nan/auto"])
def test_nan_on_one_rank_stops_every_rank(ranks, key):
    for r in range(WORLD):
        nan = ranks[r][key]
        assert nan["raised"] and nan["unchanged"]
        assert nan["scaler_skipped"] and nan["scaler_unchanged"]
        assert nan["scale"] == 2.0**7
    for p, q in zip(ranks[0][key]["after"], ranks[1][key]["after"], strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode", ["ddp", "scatter"])
def test_clipping_and_the_accumulated_direction_are_global(ranks, mode):
    single = clipped(None, None)
    for r in range(WORLD):
        got = ranks[r][f"clip/{mode}"]
        for name in ("lfmlf", "gem"):
            assert_close(got[name], single[name])
            assert_close(got[f"{name}/norms"], single[f"{name}/norms"])
            assert all(norm > 0.05 for norm in single[f"{name}/norms"])  # it clipped
        # the whole accumulated direction, on every rank alike, in the saved state too
        assert_close([got["accumulated"]], [single["accumulated"]])
        assert got["saved"].keys() == single["saved"].keys()
        assert_close(list(got["saved"].values()), list(single["saved"].values()))
    a, b = ranks[0][f"clip/{mode}"], ranks[1][f"clip/{mode}"]
    assert torch.equal(a["accumulated"], b["accumulated"])
    assert all(torch.equal(a["saved"][k], b["saved"][k]) for k in a["saved"])


def test_an_overflow_in_one_rank_columns_stops_every_rank(ranks):
    assert shard_bounds(3, WORLD) == [(0, 1), (1, 3)]  # the Inf is in the first rank's
    for r in range(WORLD):
        assert "overflows the parameters' dtype" in ranks[r]["overflow/scatter"]["raised"]
        assert ranks[r]["overflow/scatter"]["unchanged"]


def test_the_underflow_rescue_takes_the_exact_gram_on_every_rank(ranks):
    single = tiny(None, None)
    p = sum(q.numel() for q in make_model().parameters())
    for r in range(WORLD):
        got = ranks[r]["tiny/scatter"]
        for a, e in zip(got["grad"], single["grad"], strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=0)
        # the last columns, then the Gram matrix twice (the second exact), on both ranks
        kinds = [kind for kind, _ in got["collectives"]]
        assert kinds == ["reduce_scatter_tensor"] * (T - 1) + ["all_reduce"] * 3 + [
            "all_gather_into_tensor",
            "broadcast",
        ]
        assert got["collectives"][-2:] == [
            ("all_gather_into_tensor", (p - 1) * 8),
            ("broadcast", 8),
        ]
    for a, b in zip(
        ranks[0]["tiny/scatter"]["grad"], ranks[1]["tiny/scatter"]["grad"], strict=True
    ):
        assert torch.equal(a, b)


def test_a_gradscaler_reads_only_the_averaged_columns(ranks):
    for r in range(WORLD):
        huge = ranks[r]["huge/scatter"]
        assert not huge["skipped"] and huge["scale"] == 2.0**-100
        assert torch.equal(huge["w"], -torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_fewer_columns_than_ranks(ranks):
    single = one_column(None, None)
    assert single.item() < 3.0  # the constraint projected the task gradient
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["one_column/scatter"], single, rtol=1e-12, atol=0)
    assert torch.equal(ranks[0]["one_column/scatter"], ranks[1]["one_column/scatter"])


def test_per_parameter_gradvac_refuses_the_scatter_layout():
    model = make_model()
    with pytest.raises(ValueError, match="granularity='model'"):
        GradVac(
            torch.optim.SGD(model.parameters(), lr=0.1),
            T,
            granularity="parameter",
            distributed=Replicated(scatter=True),
        )
    assert all(p.grad is None for p in model.parameters())  # nothing was built


@given(n=st.integers(0, 200), world=st.integers(1, 9))
def test_shard_bounds_cover_every_column_once(n, world):
    bounds = shard_bounds(n, world)
    assert len(bounds) == world
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (lo, hi), (next_lo, _) in itertools.pairwise(bounds):
        assert hi == next_lo and hi - lo == n // world
    assert bounds[-1][1] - bounds[-1][0] == n - (world - 1) * (n // world)


def test_a_bad_layout_is_refused_before_anything_is_built():
    model = make_model()
    with pytest.raises(TypeError, match="Replicated"):
        GEMProjector(torch.optim.SGD(model.parameters(), lr=0.1), margin=0.0, distributed="ddp")
    with pytest.raises(TypeError, match="must be True, False or None"):
        Uniform(torch.optim.SGD(model.parameters(), lr=0.1), 2, distributed=Replicated(None, 1))
    assert all(p.grad is None for p in model.parameters())
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), 2, distributed=Sharded())

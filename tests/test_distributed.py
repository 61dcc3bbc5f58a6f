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

import itertools
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.multiprocessing.spawn import start_processes

from gradsurgery import GEMProjector, GradVac, PCGrad, Uniform
from gradsurgery.distributed import ColumnShard, Replicated, Sharded, shard_bounds
from gradsurgery.flat import GradientBank
from tests.distributed_cases import (
    MODES,
    NAMES,
    REFUSED,
    WORLD,
    T,
    clipped,
    make_model,
    nan_on_one_rank,
    one_column,
    opposite_huge_gradients,
    overflow_in_one_rank_columns,
    step_traffic,
    tiny,
    train,
    uniform_faults,
)


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
        for mode in ("ddp", "scatter", "fsdp"):
            results[f"traffic/{mode}/uniform"] = step_traffic(mode, "uniform", rank)
            results[f"uniform/{mode}"] = uniform_faults(rank, mode)
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


def test_uniform_exchanges_two_flags_instead_of_a_gram_matrix(ranks):
    p = sum(q.numel() for q in make_model().parameters())
    even = p // WORLD * WORLD
    for r in range(WORLD):
        assert ranks[r]["traffic/ddp/uniform"] == [("all_reduce", T * p * 8)]
        assert ranks[r]["traffic/fsdp/uniform"] == [("all_reduce", 2 * 4)]
        assert ranks[r]["traffic/scatter/uniform"] == [
            *[("reduce_scatter_tensor", even * 8)] * T,
            ("all_reduce", T * (p - even) * 8),
            ("all_reduce", 2 * 4),  # non-finite, stray: one int32 each
            ("all_gather_into_tensor", even * 8),
            ("broadcast", (p - even) * 8),
        ]


@pytest.mark.parametrize("mode", ["ddp", "scatter", "fsdp"])
def test_a_fault_on_one_rank_stops_uniform_on_every_rank(ranks, mode):
    results = [ranks[r][f"uniform/{mode}"] for r in range(WORLD)]
    expected = {
        "nan": "NonFiniteGradientError: a gradient holds NaN or Inf",
        "nan_last": "NonFiniteGradientError: a gradient holds NaN or Inf",
        "stray": "RuntimeError: a backward pass outside every",
        "scaler": "",
    }
    for fault in results[0]:
        for got in results:
            assert got[fault]["raised"].startswith(expected[fault]), (fault, got[fault])
            assert got[fault]["unchanged"]
        if fault == "scaler":
            assert all(got[fault]["skipped"] and got[fault]["scale"] == 2.0**7 for got in results)
        after = [got[fault]["after"] for got in results]
        assert all(torch.equal(a, b) for a, b in zip(*after, strict=True))
    assert ("stray" in results[0]) == (mode != "ddp")


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


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    rows=st.integers(1, 4),
    world=st.integers(1, 5),
    scale=st.sampled_from([1e-20, 1.0, 1e15]),  # within fp32
    seed=st.integers(0, 2**16),
)
def test_the_column_shards_add_up_to_the_bank(sizes, rows, world, scale, seed):
    """Over the ranks, the shards' Gram matrices sum to the bank's, exact ones too, and
    each shard's combination is the bank's on its columns (fp32 and fp64 blocks)."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float64, torch.float32]
    params = [torch.zeros(n, dtype=dtypes[i % 2], requires_grad=True) for i, n in enumerate(sizes)]
    bank = GradientBank(params, 1 + rows)
    for block in bank.blocks:
        block.copy_(torch.randn(block.shape, generator=gen, dtype=torch.float64) * scale)
    weights = torch.randn(rows, generator=gen, dtype=torch.float64)
    whole = [block[0].clone() for block in bank.blocks]
    for block, row in zip(bank.blocks, whole, strict=True):
        row += weights.to(block.dtype) @ block[1:]
    for exact in (False, True):
        shards = [ColumnShard(bank, world, rank).gram(exact=exact) for rank in range(world)]
        expected = bank.gram(exact=exact)  # fp32 sums cancel: tolerance from the magnitudes
        torch.testing.assert_close(
            sum(shards), expected, rtol=1e-5, atol=1e-5 * sum(sizes) * scale**2
        )
    for rank in range(world):
        ColumnShard(bank, world, rank).combine_(weights, accumulate=True)
    for block, row in zip(bank.blocks, whole, strict=True):
        torch.testing.assert_close(block[0], row, rtol=1e-5, atol=1e-5 * rows * scale)


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

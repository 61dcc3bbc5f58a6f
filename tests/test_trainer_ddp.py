"""SurgeryTrainer under DDP: a real two-process launch (torchrun) of a tiny BERT, gloo, CPU.

One launch of ``tests/trainer_ddp_run.py`` runs GEM, LF-MLF and PCGrad on two ranks (each
with half of every batch, two micro-batches per step): fp32 and fp64 runs, a run resumed
from a checkpoint, a run with a NaN in one rank's memory loss, the other wrappers; an
``accelerate launch`` runs GEM and a usage error on one rank. The tests compare the ranks
with each other and with one process on the union of their batches. The two launches take
about 50 s on two CPU cores (marked slow).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainer_ddp_run import OTHERS, STEPS, WRAPPERS, run
from tests.trainer_setups import (  # noqa: F401 (no_full_collection: an autouse fixture)
    no_full_collection,
    parameters,
    tiny_bert,
)

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
# accelerate's CPU launcher needs mpirun for several processes; its DDP launcher (torch's
# elastic agent) runs on the CPU when the script asks for it (use_cpu=True, gloo)
ACCELERATE = [
    *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
    *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def launch(launcher: list[str], out: Path, *names: str) -> subprocess.CompletedProcess[str]:
    """Run ``tests/trainer_ddp_run.py`` on two ranks."""
    command = [*launcher, "tests/trainer_ddp_run.py", str(out), *names]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def saved(out: Path) -> list[dict[str, Any]]:
    """What each rank saved."""
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    done = launch([*TORCHRUN, "--master_port", str(free_port())], out)
    assert done.returncode == 0, done.stderr[-4000:]
    return saved(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    one = tmp_path_factory.mktemp("one")
    return run(one, rank=0, world=1, faults=False, names=WRAPPERS + OTHERS)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


@pytest.mark.parametrize("name", WRAPPERS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_both_ranks_take_the_one_process_step_on_the_union(
    ranks: list[dict[str, Any]], single: dict[str, Any], name: str, dtype: str
) -> None:
    tag = f"{name}/{dtype}"
    assert_same(ranks[0][tag], ranks[1][tag])
    tolerance = 1e-6 if dtype == "float32" else 1e-12
    assert max_difference(ranks[0][tag], single[tag]) < tolerance
    # the run moved the parameters: equality is not that of an untrained model
    assert max_difference(ranks[0][tag], parameters(tiny_bert())) > 1e-4
    # the surgery's statistics (from reduced rows) are the same on both ranks
    logs = [[entry for entry in rank[f"{tag}/logs"] if "loss" in entry] for rank in ranks]
    assert len(logs[0]) == STEPS and logs[0] == logs[1]


@pytest.mark.parametrize("name", OTHERS)
def test_every_other_wrapper_and_stack_takes_the_one_process_step(
    ranks: list[dict[str, Any]], single: dict[str, Any], name: str
) -> None:
    tag = f"{name}/float32"
    assert_same(ranks[0][tag], ranks[1][tag])  # PCGrad, GradVac: generators seeded by rank
    assert max_difference(ranks[0][tag], single[tag]) < 1e-6
    assert max_difference(ranks[0][tag], parameters(tiny_bert())) > 1e-4


def test_a_wrapper_built_for_another_layout_is_refused(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        assert "built with distributed=Sharded(...)" in rank["clash"]
        assert rank["clash_optimizer"]  # the Trainer is left without an optimizer


def split_steps(log: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """``log`` cut before each step's first reduce-scatter."""
    starts = [
        i
        for i, (kind, _) in enumerate(log)
        if kind == "reduce_scatter_tensor" and (i == 0 or log[i - 1][0] != kind)
    ]
    return [log[a:b] for a, b in zip(starts, [*starts[1:], len(log)], strict=True)]


@pytest.mark.parametrize("name", WRAPPERS)
def test_the_rows_are_reduce_scattered_and_ddp_only_averages_the_task(
    ranks: list[dict[str, Any]], name: str
) -> None:
    p = sum(value.numel() for value in ranks[0][f"{name}/float32"].values())
    rows = 2 if name == "gem" else 3  # GEM: two constraints; LF-MLF, PCGrad: three objectives
    gram = {"gem": 3, "lfmlf": 5, "pcgrad": 4}[name]  # with the task row, or LF-MLF's ḡ
    assert p % 2 == 1  # the last rank's extra column is broadcast
    for dtype, size in (("float32", 4), ("float64", 8)):
        # Replicated() from two rows on: (rows + 1) p values instead of 2 rows p
        rows_and_gram = [("reduce_scatter_tensor", (p - 1) * size)] * rows  # each row, in place
        rows_and_gram += [("all_reduce", rows * size), ("all_reduce", gram * gram * 8)]
        result = [("all_gather_into_tensor", (p - 1) * size), ("broadcast", size)]
        for rank in ranks:
            steps = split_steps(rank[f"{name}/{dtype}/collectives"])
            assert len(steps) == STEPS
            k = len(rows_and_gram)
            assert all(step[:k] == rows_and_gram and step[k:] in ([], result) for step in steps)
            # the result is gathered whenever row 0 changed: always, but for GEM only
            # when it projected (a decision every rank takes from the same Gram matrix)
            gathered = [step[k:] == result for step in steps]
            assert any(gathered) and (name == "gem" or all(gathered))
            # DDP all-reduces .grad once per step (the last micro-batch) for GEM's task
            # gradient; every multi-objective backward runs under no_sync
            ddp = p * size if name == "gem" else 0
            assert rank[f"{name}/{dtype}/ddp_bytes"] == [ddp] * STEPS


@pytest.mark.parametrize("name", WRAPPERS)
def test_a_run_resumed_from_a_checkpoint_equals_the_uninterrupted_one(
    ranks: list[dict[str, Any]], name: str
) -> None:
    for rank in ranks:
        assert_same(rank[f"{name}/resumed"], rank[f"{name}/whole"])
        # each rank saved its own stream sources' state
        files = rank[f"{name}/checkpoint"]
        assert {"gradsurgery_sources_0.pt", "gradsurgery_sources_1.pt"} <= set(files)
        assert "gradsurgery_sources.pt" not in files
    assert_same(ranks[0][f"{name}/resumed"], ranks[1][f"{name}/resumed"])


@pytest.mark.parametrize("name", WRAPPERS)
def test_nan_on_one_rank_stops_both_before_the_step(ranks: list[dict[str, Any]], name: str) -> None:
    for rank in ranks:
        assert rank[f"{name}/nan"] == "NonFiniteGradientError"
        assert rank[f"{name}/nan_step"] == 1  # the second step raised, on both ranks,
        # at its first micro-batch's NaN: parameters as after the first step
        assert_same(rank[f"{name}/nan_parameters"], rank[f"{name}/nan_after_first_step"])
    assert_same(ranks[0][f"{name}/nan_parameters"], ranks[1][f"{name}/nan_parameters"])


def test_accelerate_launch_runs_the_same_steps_and_a_usage_error_stops_the_job(
    tmp_path: Path, single: dict[str, Any]
) -> None:
    accelerate = [*ACCELERATE, "--main_process_port", str(free_port())]
    done = launch(accelerate, tmp_path, "gem", "usage_error")
    ranks = saved(tmp_path)  # GEM ran, then rank 1 alone made a usage error
    assert_same(ranks[0]["gem/float32"], ranks[1]["gem/float32"])
    assert max_difference(ranks[0]["gem/float32"], single["gem/float32"]) < 1e-6
    task = 4 * sum(value.numel() for value in ranks[0]["gem/float32"].values())  # 4p bytes
    assert ranks[0]["gem/float32/ddp_bytes"] == [task] * STEPS
    # the job ends at once, with rank 1's message; rank 0, waiting in a collective, does not
    # time out: the launcher stops it, or gloo aborts it when rank 1's connection closes,
    # and which of the two failures the launcher reports first is a race between them
    assert done.returncode != 0
    assert "ValueError: the loss of source 'mlm' must be a 0-d tensor, got (1,)" in done.stderr
    cause = done.stderr[done.stderr.index("Root Cause") :]
    assert "rank      : 1" in cause or (
        "rank      : 0" in cause and "Signal 6 (SIGABRT)" in cause
    ), cause

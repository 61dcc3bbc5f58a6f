"""SurgeryTrainer: configurations refused before any step, batch drawing, lazy imports."""

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate.utils import DistributedType
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradsurgery
from gradsurgery import (
    GEMProjector,
    PhasedLR,
    Uniform,
)
from gradsurgery.distributed import Replicated
from gradsurgery.integrations.processes import layout, rank_file
from gradsurgery.integrations.sources import BatchCycle
from gradsurgery.integrations.transformers import SOURCES_NAME, SurgeryTrainer
from tests.trainer_setups import (  # noqa: F401 (no_full_collection: an autouse fixture)
    LANGS,
    arguments,
    batches,
    examples,
    make_trainer,
    no_full_collection,
    parameters,
    tagging_loss,
    tiny_bert,
    with_grad_scaler,
)


def test_under_a_grad_scaler_the_surgery_must_be_outermost(tmp_path: Path) -> None:
    inside = make_trainer("phased_gem", tmp_path)
    with_grad_scaler(inside)
    with pytest.raises(ValueError, match="must be the outermost wrapper"):
        inside.create_optimizer()
    assert inside.optimizer is None
    model = tiny_bert()
    outside = SurgeryTrainer(
        model=model,
        args=arguments(tmp_path),
        wrap=lambda o: GEMProjector(PhasedLR(o, model, window=1), margin=0.0),
        sources={"0": (batches(1, seed=7), tagging_loss)},
    )
    scaler = with_grad_scaler(outside)
    outside.create_optimizer()
    assert outside.wrappers is not None and outside.wrappers.surgery is not None
    assert outside.wrappers.surgery.grad_scaler is scaler


def plain_adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


BAD_INIT: dict[str, tuple[dict[str, Any], str]] = {
    "no optimizer": ({}, "either wrap="),
    "both": (
        {"wrap": lambda o: o, "optimizers": ("model", None)},
        "not both",
    ),
    "plain optimizer given": ({"optimizers": ("model", None)}, "not a gradsurgery wrapper"),
    "wrap not callable": ({"wrap": 3}, "wrap must be callable"),
    "batches not iterable": (
        {"wrap": lambda o: o, "sources": {"mlm": (3, tagging_loss)}},
        "must be iterable",
    ),
    "loss not callable": ({"wrap": lambda o: o, "sources": {"mlm": ([1], 2)}}, "callable"),
    "not a pair": ({"wrap": lambda o: o, "sources": {"mlm": [1]}}, r"\(batches, loss\) pair"),
}


@pytest.mark.parametrize("case", list(BAD_INIT))
def test_bad_construction_is_refused(case: str, tmp_path: Path) -> None:
    settings, message = BAD_INIT[case]
    model = tiny_bert()
    if settings.get("optimizers", (None,))[0] == "model":
        settings = {**settings, "optimizers": (plain_adamw(model), None)}
    with pytest.raises(ValueError, match=message):
        SurgeryTrainer(model=model, args=arguments(tmp_path), **settings)


BAD_TRAIN: dict[str, tuple[Any, dict[str, Any], dict[str, Any], str]] = {
    "wrap returns a plain optimizer": (lambda o: o, {}, {}, "gradsurgery wrapper around"),
    "missing constraint": (
        lambda o: GEMProjector(o, margin=0.0, constraints=["mlm", "xsr"]),
        {"mlm": (batches(1, 7), tagging_loss)},
        {},
        r"needs one for each of the constraints \['mlm', 'xsr'\]",
    ),
    "unknown source": (
        lambda o: GEMProjector(o, margin=0.0, constraints=["mlm"]),
        {"mlm": (batches(1, 7), tagging_loss), "nlm": (batches(1, 7), tagging_loss)},
        {},
        "no other",
    ),
    "multi-objective without train_objective": (
        lambda o: Uniform(o, LANGS),
        {},
        {},
        "needs train_objective",
    ),
    "train_objective for GEM": (
        lambda o: GEMProjector(o, margin=0.0, constraints=["mlm"]),
        {"mlm": (batches(1, 7), tagging_loss)},
        {"train_objective": "en"},
        "applies to multi-objective wrappers",
    ),
    "both train_objective and compute_objectives": (
        lambda o: Uniform(o, LANGS),
        {},
        {"train_objective": "en", "compute_objectives": lambda m, b: {}},
        "not both",
    ),
    "wrapper with its own GradScaler": (
        lambda o: GEMProjector(o, margin=0.0, grad_scaler=torch.amp.GradScaler("cpu")),
        {"0": (batches(1, 7), tagging_loss)},
        {},
        "leave it unset",
    ),
    "memory loss not a scalar": (
        lambda o: GEMProjector(o, margin=0.0, constraints=["mlm"]),
        {"mlm": (batches(1, 7), lambda m, b: m(**b).logits)},
        {},
        r"source 'mlm' must be a 0-d tensor, got \(4, 6, 3\)",
    ),
    "iterator that runs out": (
        lambda o: GEMProjector(o, margin=0.0, constraints=["mlm"]),
        {"mlm": (iter([]), tagging_loss)},
        {},
        "the iterator of source 'mlm' ran out at draw 0",
    ),
    "compute_objectives misses an objective": (
        lambda o: Uniform(o, LANGS),
        {"fr": (batches(1, 2), tagging_loss)},
        {"compute_objectives": lambda m, b: {"en": tagging_loss(m, b)}},
        r"for the objectives \['en', 'de'\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_configuration_is_refused_before_any_step(case: str, tmp_path: Path) -> None:
    wrap, sources, extra, message = BAD_TRAIN[case]
    model = tiny_bert()
    before = parameters(model)
    trainer = SurgeryTrainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=examples(8, seed=0),
        wrap=wrap,
        sources=sources,
        **extra,
    )
    with pytest.raises(ValueError, match=message):
        trainer.train()
    after = parameters(model)
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("is_fsdp_enabled", "not run under the Trainer's FSDP"),
        ("is_deepspeed_enabled", "DeepSpeed"),
    ],
)
def test_fsdp_and_deepspeed_are_refused(tmp_path: Path, flag: str, message: str) -> None:
    trainer = make_trainer("gem", tmp_path)
    setattr(trainer, flag, True)
    with pytest.raises(ValueError, match=message):
        trainer.create_optimizer()
    assert trainer.optimizer is None


@pytest.mark.parametrize(
    ("kind", "processes", "expected"),
    [
        (DistributedType.NO, 1, None),
        (DistributedType.MULTI_CPU, 1, None),
        (DistributedType.MULTI_CPU, 2, Replicated),
        (DistributedType.MULTI_GPU, 8, Replicated),
        (DistributedType.XLA, 2, ValueError),
        (DistributedType.FSDP, 2, ValueError),
        (DistributedType.DEEPSPEED, 1, ValueError),
    ],
)
def test_the_layout_follows_the_trainers_set_up(
    kind: DistributedType, processes: int, expected: Any
) -> None:
    accelerator: Any = SimpleNamespace(distributed_type=kind, num_processes=processes)
    if expected is ValueError:
        with pytest.raises(ValueError, match="SurgeryTrainer"):
            layout(accelerator, deepspeed=False, fsdp=False)
    elif expected is None:
        assert layout(accelerator, deepspeed=False, fsdp=False) is None
    else:
        assert layout(accelerator, deepspeed=False, fsdp=False) == expected()


def test_each_rank_of_several_names_its_own_sources_file() -> None:
    one: Any = SimpleNamespace(num_processes=1, process_index=0)
    second: Any = SimpleNamespace(num_processes=2, process_index=1)
    assert rank_file(SOURCES_NAME, one) == SOURCES_NAME
    assert rank_file(SOURCES_NAME, second) == "gradsurgery_sources_1.pt"


def test_batch_cycle_draws_by_position() -> None:
    cycle = BatchCycle("m", [0, 1, 2])
    assert [cycle.at(i) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert cycle.at(4) == 1  # backward: starts the stream again
    assert BatchCycle("m", [0, 1, 2]).at(5) == 2  # a fresh cycle (a resumed run) agrees
    with pytest.raises(ValueError, match="source 'e' has no batch"):
        BatchCycle("e", []).at(0)


@given(
    count=st.integers(min_value=1, max_value=5),
    positions=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=20),
)
def test_a_cycle_draws_the_batch_of_each_position_in_any_order(
    count: int, positions: list[int]
) -> None:
    cycle = BatchCycle("m", list(range(count)))
    assert [cycle.at(position) for position in positions] == [p % count for p in positions]


def test_only_the_integration_module_imports_transformers_when_loaded() -> None:
    """``import gradsurgery`` (and any module but the integration) works without it."""

    def loaded_imports(body: list[ast.stmt]) -> list[str]:
        names = []
        for node in body:
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                names.append(node.module)
            elif isinstance(node, ast.If) and ast.unparse(node.test) != "TYPE_CHECKING":
                names += loaded_imports(node.body) + loaded_imports(node.orelse)
            elif isinstance(node, ast.Try):
                names += loaded_imports(node.body)
        return names

    package = Path(gradsurgery.__file__).parent
    importers = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if any(
            name.split(".")[0] in ("transformers", "accelerate")
            for name in loaded_imports(ast.parse(path.read_text()).body)
        )
    }
    # processes.py is imported only by transformers.py
    assert importers == {"integrations/transformers.py", "integrations/processes.py"}

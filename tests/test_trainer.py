"""SurgeryTrainer: every wrapper inside transformers' Trainer.train(), on a tiny BERT."""

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import accelerate.utils.memory
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForTokenClassification,
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    TrainingArguments,
)

import gradsurgery
from gradsurgery import (
    MGDA,
    GEMProjector,
    GradVac,
    ParetoLessForgetting,
    PCGrad,
    PhasedLR,
    Uniform,
)
from gradsurgery.data import (
    MemoryBatches,
    ParallelCollator,
    read_conllu,
    read_parallel,
    read_text,
    sample_file,
    tag_vocabulary,
    tagging_examples,
    text_examples,
)
from gradsurgery.integrations.sources import BatchCycle
from gradsurgery.integrations.transformers import SOURCES_NAME, SurgeryTrainer
from gradsurgery.objectives import MaskedLM, SentenceRetrieval, share_encoder
from tests.text_models import config, tokenizer

VOCAB, LABELS, LENGTH = 40, 3, 6
LANGS = ("en", "de", "fr")


@pytest.fixture(autouse=True)
def _no_full_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    # Trainer.train() starts with accelerate's free_memory(), a full gc.collect() that takes
    # about a second in a pytest process; there is no device cache to free on the CPU.
    monkeypatch.setattr(accelerate.utils.memory, "clear_device_cache", lambda **_: None)


def tiny_bert(seed: int = 0) -> BertForTokenClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config.num_labels = LABELS
    return BertForTokenClassification(config)


def examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Token-tagging examples whose label is a fixed function of the token (learnable)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (LENGTH,), generator=generator)
        out.append({"input_ids": ids, "labels": (ids * (seed + 1)) % LABELS})
    return out


def batches(count: int, seed: int, size: int = 4) -> list[dict[str, torch.Tensor]]:
    data = examples(count * size, seed)
    return [
        {key: torch.stack([e[key] for e in data[i : i + size]]) for key in data[0]}
        for i in range(0, len(data), size)
    ]


def tagging_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss: torch.Tensor = model(**batch).loss
    return loss


def arguments(out: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def memory() -> dict[str, Any]:
    return {"mlm": (batches(3, seed=7), tagging_loss), "xsr": (batches(2, seed=8), tagging_loss)}


def languages() -> dict[str, Any]:
    return {"de": (batches(3, seed=1), tagging_loss), "fr": (batches(3, seed=2), tagging_loss)}


Wrap = Callable[[torch.optim.Optimizer], torch.optim.Optimizer]
MEMORY = ["mlm", "xsr"]

# name: (model -> wrap, sources, train_objective, prefixes of the logged statistics)
SETUPS: dict[str, tuple[Callable[[nn.Module], Wrap], Callable[[], Any], str | None, list[str]]] = {
    "gem": (lambda m: lambda o: GEMProjector(o, constraints=MEMORY), memory, None, ["gem/"]),
    "agem": (
        lambda m: lambda o: GEMProjector(o, constraints=MEMORY, mode="agem"),
        memory,
        None,
        ["gem/"],
    ),
    "lfmlf": (lambda m: lambda o: ParetoLessForgetting(o, LANGS), languages, "en", ["lfmlf/"]),
    "uniform": (lambda m: lambda o: Uniform(o, LANGS), languages, "en", ["uniform/"]),
    "pcgrad": (
        lambda m: lambda o: PCGrad(o, LANGS, generator=torch.Generator().manual_seed(3)),
        languages,
        "en",
        ["pcgrad/"],
    ),
    "gradvac": (lambda m: lambda o: GradVac(o, LANGS), languages, "en", ["gradvac/"]),
    "mgda": (lambda m: lambda o: MGDA(o, LANGS), languages, "en", ["mgda/"]),
    "phased": (lambda m: lambda o: PhasedLR(o, m, window=1), dict, None, ["phased/"]),
    "phased_gem": (
        lambda m: lambda o: PhasedLR(GEMProjector(o, constraints=MEMORY), m, window=1),
        memory,
        None,
        ["gem/", "phased/"],
    ),
}


def make_trainer(
    name: str, out: Path, eval_dataset: Any = None, **overrides: Any
) -> SurgeryTrainer:
    make_wrap, make_sources, objective, _ = SETUPS[name]
    model = tiny_bert()
    return SurgeryTrainer(
        model=model,
        args=arguments(out, **overrides),
        train_dataset=examples(16, seed=0),
        eval_dataset=eval_dataset,
        wrap=make_wrap(model),
        sources=make_sources(),
        train_objective=objective,
    )


def parameters(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(SETUPS))
def test_each_wrapper_trains_and_logs_its_statistics(name: str, tmp_path: Path) -> None:
    trainer = make_trainer(name, tmp_path)
    before = parameters(trainer.model)
    trainer.train()
    after = parameters(trainer.model)
    assert trainer.state.global_step == 3
    assert any(not torch.equal(before[key], after[key]) for key in before)
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    # the Trainer's linear schedule drives the wrapper's (the inner optimizer's) groups
    assert [entry["learning_rate"] for entry in steps] == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3])
    assert trainer.optimizer is not None
    assert all(group["lr"] == 0.0 for group in trainer.optimizer.param_groups)
    for prefix in SETUPS[name][3]:
        for entry in steps:
            assert any(key.startswith(prefix) for key in entry), (prefix, entry)
    stack = trainer.wrappers
    assert stack is not None
    final = steps[-1]
    if stack.surgery is not None:
        assert stack.surgery.last_stats is not None
        assert final == {**final, **stack.surgery.last_stats.to_dict()}
    if name in ("gem", "phased_gem"):
        # the projected step increases no memory loss to first order
        assert all(entry["gem/dot_after/mlm"] >= -1e-6 for entry in steps)
        assert all(entry["gem/dot_after/xsr"] >= -1e-6 for entry in steps)
    if name == "agem":  # A-GEM: not the mean memory loss
        mean = [entry["gem/dot_after/mlm"] + entry["gem/dot_after/xsr"] for entry in steps]
        assert all(value >= -1e-6 for value in mean)


def hand_written_gem(steps: int, clip_first: bool) -> dict[str, torch.Tensor]:
    """GEM as a user writes it, with the Trainer's AdamW, schedule and clipping."""
    model = tiny_bert()
    data = examples(8, seed=0)
    mem = memory()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    opt = GEMProjector(inner, constraints=["mlm", "xsr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    cycles = {name: BatchCycle(name, batches) for name, (batches, _) in mem.items()}
    for step in range(steps):
        chunk = data[4 * step : 4 * step + 4]
        batch = {key: torch.stack([e[key] for e in chunk]) for key in chunk[0]}
        opt.zero_grad()
        tagging_loss(model, batch).backward()
        for name in ("mlm", "xsr"):
            with opt.constraint(name):
                tagging_loss(model, cycles[name].at(step)).backward()
        if clip_first:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.apply_surgery()
        else:
            opt.apply_surgery()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        schedule.step()
    return parameters(model)


def test_gem_in_the_trainer_equals_the_hand_written_loop(tmp_path: Path) -> None:
    trainer = make_trainer(
        "gem",
        tmp_path,
        max_steps=2,
        max_grad_norm=0.5,
        optim="adamw_torch",
        train_sampling_strategy="sequential",
    )
    trainer.train_dataset = examples(8, seed=0)
    trainer.train()
    assert any(entry["gem/projected"] == 1.0 for entry in trainer.state.log_history[:2])
    assert all(entry["grad_norm"] > 0.5 for entry in trainer.state.log_history[:2])
    got = parameters(trainer.model)
    expected = hand_written_gem(2, clip_first=False)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    # the order matters: clipping before the surgery gives other parameters
    other = hand_written_gem(2, clip_first=True)
    assert any(not torch.allclose(got[key], other[key], atol=1e-6) for key in got)


def test_gradient_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    def run(out: Path, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = tiny_bert()
        same = batches(1, seed=1)  # one memory batch: every micro-batch draws it
        trainer = SurgeryTrainer(
            model=model,
            args=arguments(
                out,
                max_steps=2,
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                train_sampling_strategy="sequential",
            ),
            train_dataset=examples(8, seed=0),
            wrap=lambda o: Uniform(o, ["en", "de"]),
            sources={"de": (same, tagging_loss)},
            train_objective="en",
        )
        # BERT's forward takes **kwargs but its loss ignores num_items_in_batch: tell the
        # Trainer to divide the task loss by the accumulation steps (docs/trainer.md)
        trainer.loss_is_scaled_for_ga = False
        trainer.train()
        return parameters(model)

    large = run(tmp_path / "large", 4, 1)
    accumulated = run(tmp_path / "accumulated", 2, 2)
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu_reaches_the_memory_losses(tmp_path: Path) -> None:
    model = tiny_bert()
    dtypes: list[torch.dtype] = []
    model.classifier.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))

    def recording_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = tagging_loss(model, batch)
        dtypes.append(loss.dtype)
        return loss

    trainer = SurgeryTrainer(
        model=model,
        args=arguments(tmp_path, bf16=True),
        train_dataset=examples(16, seed=0),
        wrap=lambda o: GEMProjector(o, constraints=["mlm"]),
        sources={"mlm": (batches(2, seed=7), recording_loss)},
    )
    before = parameters(trainer.model)
    trainer.train()
    # per step: the task forward, then the memory forward under autocast and its fp32 loss
    assert dtypes == [torch.bfloat16, torch.bfloat16, torch.float32] * 3
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(entry["gem/grad_norm"])) for entry in steps)
    after = parameters(trainer.model)
    assert any(not torch.equal(before[key], after[key]) for key in before)


def with_grad_scaler(trainer: SurgeryTrainer, scale: float = 2.0**12) -> torch.amp.GradScaler:
    """Give the Trainer the GradScaler that fp16 on a GPU gives it (here on the CPU)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    trainer.accelerator.scaler = scaler
    return scaler


@pytest.mark.parametrize(("name", "clip"), [("gem", 0.5), ("lfmlf", 0.5), ("gem", 0.0)])
def test_the_trainers_grad_scaler_unscales_every_row_once(
    name: str, clip: float, tmp_path: Path
) -> None:
    plain = make_trainer(name, tmp_path / "plain", max_grad_norm=clip)
    plain.train()
    scaled = make_trainer(name, tmp_path / "scaled", max_grad_norm=clip)
    scaler = with_grad_scaler(scaled)
    scaled.train()
    assert scaled.wrappers is not None and scaled.wrappers.surgery is not None
    assert scaled.wrappers.surgery.grad_scaler is scaler
    # a power-of-two scale, unscaled exactly once before clipping, changes nothing
    expected, got = parameters(plain.model), parameters(scaled.model)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    norms = [entry.get("grad_norm") for entry in scaled.state.log_history]
    assert norms == [entry.get("grad_norm") for entry in plain.state.log_history]


def test_a_step_whose_memory_gradient_overflows_is_skipped(tmp_path: Path) -> None:
    calls: list[int] = []

    def overflowing_first(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        loss = tagging_loss(model, batch)
        return loss * float("inf") if len(calls) == 1 else loss

    model = tiny_bert()
    trainer = SurgeryTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=1),
        train_dataset=examples(16, seed=0),
        wrap=lambda o: GEMProjector(o, constraints=["mlm"]),
        sources={"mlm": (batches(2, seed=7), overflowing_first)},
    )
    scaler = with_grad_scaler(trainer)
    before = parameters(model)
    trainer.train()
    assert trainer.state.log_history[0]["gem/skipped"] == 1.0
    assert scaler.get_scale() == 2.0**11
    after = parameters(model)
    assert all(torch.equal(before[key], after[key]) for key in before)


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
        wrap=lambda o: GEMProjector(PhasedLR(o, model, window=1)),
        sources={"0": (batches(1, seed=7), tagging_loss)},
    )
    scaler = with_grad_scaler(outside)
    outside.create_optimizer()
    assert outside.wrappers is not None and outside.wrappers.surgery is not None
    assert outside.wrappers.surgery.grad_scaler is scaler


@pytest.mark.parametrize("name", ["gem", "lfmlf", "gradvac", "pcgrad", "phased_gem"])
def test_resume_from_a_checkpoint_continues_the_run(name: str, tmp_path: Path) -> None:
    settings: dict[str, Any] = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    whole = make_trainer(name, tmp_path / "whole", **settings)
    whole.train()
    resumed = make_trainer(name, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    expected, got = parameters(whole.model), parameters(resumed.model)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert whole.optimizer is not None and resumed.optimizer is not None
    saved, loaded = whole.optimizer.state_dict(), resumed.optimizer.state_dict()
    for entry_saved, entry_loaded in zip(saved["gradsurgery"], loaded["gradsurgery"], strict=True):
        assert entry_saved.keys() == entry_loaded.keys()
        for key, value in entry_saved.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(entry_loaded[key], value, rtol=1e-5, atol=1e-7)
            elif not isinstance(value, dict):
                assert entry_loaded[key] == value, key


class SeededStream:
    """An endless stream of random batches that saves where it is, as MemoryBatches does."""

    def __init__(self, seed: int) -> None:
        self.data = examples(16, seed=seed)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> "SeededStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        chosen = torch.randperm(len(self.data), generator=self.generator)[:4].tolist()
        return {key: torch.stack([self.data[i][key] for i in chosen]) for key in self.data[0]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def test_resume_restores_a_stream_source_where_it_was(tmp_path: Path) -> None:
    def trainer(out: Path) -> SurgeryTrainer:
        return SurgeryTrainer(
            model=tiny_bert(),
            args=arguments(out, max_steps=4, save_strategy="steps", save_steps=2),
            train_dataset=examples(16, seed=0),
            wrap=lambda o: GEMProjector(o, constraints=["mlm"]),
            sources={"mlm": (SeededStream(5), tagging_loss)},
        )

    whole = trainer(tmp_path / "whole")
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / SOURCES_NAME).is_file()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = parameters(whole.model), parameters(resumed.model)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    # without the file the stream could only start afresh: refused
    (checkpoint / SOURCES_NAME).unlink()
    with pytest.raises(ValueError, match=f"has no {SOURCES_NAME}"):
        trainer(tmp_path / "fresh").train(resume_from_checkpoint=str(checkpoint))


def test_compute_objectives_splits_a_batch_keyed_by_language(tmp_path: Path) -> None:
    class Keyed(torch.utils.data.Dataset[dict[str, Any]]):
        def __init__(self) -> None:
            self.parts = {lang: examples(8, seed=i) for i, lang in enumerate(("en", "de"))}

        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> dict[str, Any]:
            return {lang: part[index] for lang, part in self.parts.items()}

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            lang: {key: torch.stack([item[lang][key] for item in items]) for key in items[0][lang]}
            for lang in items[0]
        }

    seen: list[set[str]] = []

    def split(model: nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        seen.append(set(inputs))
        return {lang: tagging_loss(model, batch) for lang, batch in inputs.items()}

    trainer = SurgeryTrainer(
        model=tiny_bert(),
        args=arguments(tmp_path, remove_unused_columns=False),
        train_dataset=Keyed(),
        data_collator=collate,
        wrap=lambda o: ParetoLessForgetting(o, LANGS),
        sources={"fr": (batches(2, seed=2), tagging_loss)},
        compute_objectives=split,
    )
    trainer.train()
    assert seen == [{"en", "de"}] * 3
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 3
    for entry in steps:
        weights = [entry[f"lfmlf/weight/{lang}"] for lang in LANGS]
        assert all(w >= -1e-9 for w in weights)
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)


def test_gem_with_the_papers_memory_objectives_on_real_formats(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    sentences = read_conllu(sample_file("en_pos.conllu"))
    tags = tag_vocabulary(sentences)
    torch.manual_seed(0)
    task = BertForTokenClassification(config(len(tok), labels=len(tags)))
    mlm = share_encoder(BertForMaskedLM(config(len(tok))), task)
    train = tagging_examples(tok, sentences, tags)
    memory_text = text_examples(tok, read_text(sample_file("memory.en")))
    pairs = read_parallel(
        sample_file("parallel.en"), sample_file("parallel.de"), sample_file("parallel.en-de.align")
    )
    mlm_collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.5, seed=0)
    trainer = SurgeryTrainer(
        model=task,
        args=arguments(tmp_path / "out", per_device_train_batch_size=2),
        train_dataset=train,
        data_collator=DataCollatorForTokenClassification(tok),
        wrap=lambda o: GEMProjector(o, constraints=["mlm", "xsr"]),
        sources={
            "mlm": (MemoryBatches(memory_text, mlm_collator, batch_size=2, seed=0), MaskedLM(mlm)),
            "xsr": (
                MemoryBatches(pairs, ParallelCollator(tok), batch_size=2, seed=0),
                SentenceRetrieval(),
            ),
        },
    )
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 3
    for entry in steps:
        assert entry["gem/dot_after/mlm"] >= -1e-6
        assert entry["gem/dot_after/xsr"] >= -1e-6


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
        lambda o: GEMProjector(o, constraints=["mlm", "xsr"]),
        {"mlm": (batches(1, 7), tagging_loss)},
        {},
        r"needs one for each of the constraints \['mlm', 'xsr'\]",
    ),
    "unknown source": (
        lambda o: GEMProjector(o, constraints=["mlm"]),
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
        lambda o: GEMProjector(o, constraints=["mlm"]),
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
        lambda o: GEMProjector(o, grad_scaler=torch.amp.GradScaler("cpu")),
        {"0": (batches(1, 7), tagging_loss)},
        {},
        "leave it unset",
    ),
    "memory loss not a scalar": (
        lambda o: GEMProjector(o, constraints=["mlm"]),
        {"mlm": (batches(1, 7), lambda m, b: m(**b).logits)},
        {},
        r"source 'mlm' must be a 0-d tensor, got \(4, 6, 3\)",
    ),
    "iterator that runs out": (
        lambda o: GEMProjector(o, constraints=["mlm"]),
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


def test_a_wrapper_given_through_optimizers_runs(tmp_path: Path) -> None:
    model = tiny_bert()
    opt = GEMProjector(torch.optim.SGD(model.parameters(), lr=0.1), constraints=["mlm"])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    trainer = SurgeryTrainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=examples(16, seed=0),
        optimizers=(opt, schedule),
        sources={"mlm": (batches(2, seed=7), tagging_loss)},
    )
    trainer.train()
    assert opt.last_stats is not None
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["learning_rate"] for entry in steps] == pytest.approx([0.1, 0.05, 0.025])


def test_evaluation_during_training_leaves_the_steps_alone(tmp_path: Path) -> None:
    plain = make_trainer("gem", tmp_path / "plain")
    plain.train()
    evaluated = make_trainer(
        "gem",
        tmp_path / "evaluated",
        eval_dataset=examples(8, seed=3),
        eval_strategy="steps",
        eval_steps=1,
    )
    evaluated.train()
    evaluations = [entry for entry in evaluated.state.log_history if "eval_loss" in entry]
    assert len(evaluations) == 3
    assert not any(key.startswith("gem/") for entry in evaluations for key in entry)
    expected, got = parameters(plain.model), parameters(evaluated.model)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_distributed_set_ups_are_refused(tmp_path: Path) -> None:
    trainer = make_trainer("gem", tmp_path)
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="single process without DeepSpeed or FSDP"):
        trainer.create_optimizer()
    assert trainer.optimizer is None


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
    assert importers == {"integrations/transformers.py"}

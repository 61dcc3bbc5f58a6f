"""SurgeryTrainer: every wrapper inside transformers' Trainer.train(), on a tiny BERT."""

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    BertForMaskedLM,
    BertForTokenClassification,
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
)

from gradsurgery import (
    GEMProjector,
    ParetoLessForgetting,
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
from tests.trainer_setups import (  # noqa: F401 (no_full_collection: an autouse fixture)
    LANGS,
    SETUPS,
    arguments,
    batches,
    examples,
    make_trainer,
    memory,
    no_full_collection,
    parameters,
    tagging_loss,
    tiny_bert,
    with_grad_scaler,
)


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
    opt = GEMProjector(inner, margin=0.0, constraints=["mlm", "xsr"])
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
        wrap=lambda o: GEMProjector(o, margin=0.0, constraints=["mlm"]),
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
        wrap=lambda o: GEMProjector(o, margin=0.0, constraints=["mlm"]),
        sources={"mlm": (batches(2, seed=7), overflowing_first)},
    )
    scaler = with_grad_scaler(trainer)
    before = parameters(model)
    trainer.train()
    assert trainer.state.log_history[0]["gem/skipped"] == 1.0
    assert scaler.get_scale() == 2.0**11
    after = parameters(model)
    assert all(torch.equal(before[key], after[key]) for key in before)


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
            wrap=lambda o: GEMProjector(o, margin=0.0, constraints=["mlm"]),
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
        wrap=lambda o: GEMProjector(o, margin=0.0, constraints=["mlm", "xsr"]),
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


def test_a_wrapper_given_through_optimizers_runs(tmp_path: Path) -> None:
    model = tiny_bert()
    opt = GEMProjector(torch.optim.SGD(model.parameters(), lr=0.1), margin=0.0, constraints=["mlm"])
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

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorForLanguageModeling,
)

from gradsurgery import GEMProjector, ParetoLessForgetting
from gradsurgery.data import (
    IGNORE_INDEX,
    MemoryBatches,
    ParallelBatch,
    ParallelCollator,
    SentencePair,
    WordEncoding,
    read_parallel,
    read_text,
    sample_file,
    text_examples,
)
from gradsurgery.objectives import (
    CrossLingualAlignment,
    MaskedLM,
    MemoryObjective,
    SentenceRetrieval,
    alignment_loss,
    auxiliary_loss,
    frozen_copy,
    mean_pool,
    mlm_loss,
    mlm_perplexity,
    precision_at_k,
    retrieval_precision,
    share_encoder,
    word_pool,
    xsr_loss,
)
from tests.text_models import FixedEncoder, config, task_and_mlm, tokenizer


def encoding(ids: list[list[int]], words: list[list[int]]) -> WordEncoding:
    input_ids = torch.tensor(ids)
    word_index = torch.tensor(words)
    return WordEncoding(input_ids, (input_ids != 0).long(), word_index, int(word_index.max()) + 1)


def pairs_batch(tmp_path: Path) -> ParallelBatch:
    pairs = read_parallel(
        sample_file("parallel.en"), sample_file("parallel.de"), sample_file("parallel.en-de.align")
    )
    return ParallelCollator(tokenizer(tmp_path))(pairs)


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def test_pooling_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 1.0]]))
    words = word_pool(hidden, torch.tensor([[-1, 0, 0]]), 2)
    assert torch.equal(words, torch.tensor([[4.0, 3.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="hidden must be"):
        mean_pool(hidden, torch.ones(1, 2))


def test_mlm_loss_by_hand() -> None:
    vocab = 4
    logits = torch.zeros(1, 3, vocab)
    logits[0, 2] = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0])  # p(0) = 3/6
    model = FixedLogits(logits)
    batch = {
        "input_ids": torch.zeros(1, 3, dtype=torch.long),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.tensor([[IGNORE_INDEX, 1, 0]]),
    }
    expected = (math.log(vocab) + math.log(2.0)) / 2  # uniform at 1, p = 1/2 at 2
    assert mlm_loss(model, batch).item() == pytest.approx(expected, rel=1e-6)
    nothing = dict(batch, labels=torch.full((1, 3), IGNORE_INDEX))
    assert mlm_loss(model, nothing).item() == 0.0
    with pytest.raises(ValueError, match="the batch has no \\['labels'\\]"):
        mlm_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["labels"]})


def test_masking_is_deterministic_with_a_seed(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    examples = text_examples(tok, read_text(sample_file("memory.en")))
    masks = [
        DataCollatorForLanguageModeling(tok, mlm_probability=0.5, seed=11)(examples)["labels"]
        for _ in range(2)
    ]
    assert torch.equal(masks[0], masks[1])
    other = DataCollatorForLanguageModeling(tok, mlm_probability=0.5, seed=12)(examples)
    assert not torch.equal(masks[0], other["labels"])
    width = masks[0].shape[1]
    special = torch.tensor(
        [e["special_tokens_mask"] + [1] * (width - len(e["special_tokens_mask"])) for e in examples]
    )
    assert (masks[0][special.bool()] == IGNORE_INDEX).all()  # [CLS], [SEP], padding: never


def test_mlm_perplexity_is_exp_of_the_mean_loss(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    _, mlm = task_and_mlm(len(tok))
    texts = read_text(sample_file("memory.en"))
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.5, seed=5)
    batch = collator(text_examples(tok, texts))
    mlm.train()
    with torch.no_grad():
        loss = mlm_loss(mlm, batch).item()
    perplexity = mlm_perplexity(mlm, tok, texts, mlm_probability=0.5, seed=5, batch_size=8)
    assert perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert mlm.training  # mode restored
    assert mlm_perplexity(mlm, tok, texts, mlm_probability=0.5, seed=5) == perplexity
    with pytest.raises(ValueError, match="mlm_probability must be"):
        mlm_perplexity(mlm, tok, texts, mlm_probability=0)


def test_xsr_loss_by_hand() -> None:
    # token i has vector e_i; sentence vectors are means over non-pad tokens
    model = FixedEncoder(torch.eye(4))
    source = encoding([[1, 0], [2, 0]], [[0, -1], [1, -1]])
    target = encoding([[1, 3], [2, 2]], [[0, 1], [2, -1]])
    batch = ParallelBatch(source, target, torch.tensor([0]), torch.tensor([0]))
    # cos(u_0, v_0) = 1/√2, cos(u_0, v_1) = 0, cos(u_1, v_0) = 0, cos(u_1, v_1) = 1
    tau = 0.5
    s = 1 / math.sqrt(2) / tau
    expected = (-s + math.log(math.exp(s) + 1) - 1 / tau + math.log(math.exp(1 / tau) + 1)) / 2
    assert xsr_loss(model, batch, temperature=tau).item() == pytest.approx(expected, rel=1e-6)
    both = (
        expected + (-s + math.log(math.exp(s) + 1) - 1 / tau + math.log(math.exp(1 / tau) + 1)) / 2
    ) / 2
    assert xsr_loss(model, batch, temperature=tau, symmetric=True).item() == pytest.approx(both)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        SentenceRetrieval(temperature=0.0)
    one = ParallelBatch(
        encoding([[1]], [[0]]), encoding([[1]], [[0]]), torch.tensor([0]), torch.tensor([0])
    )
    with pytest.raises(ValueError, match="at least 2 pairs in a batch, got 1"):
        xsr_loss(model, one)


def test_precision_at_k_on_a_constructed_case() -> None:
    source = torch.eye(4)
    target = torch.eye(4)
    target[2] = torch.tensor([0.0, 0.0, 1.0, 2.0])  # cos 0.45 with source 2, 0.89 with 3
    target[3] = torch.tensor([0.0, 0.0, 3.0, 1.0])  # cos 0.32 with source 3, 0.95 with 2
    assert precision_at_k(source, target, (1, 2, 4)) == {1: 0.5, 2: 1.0, 4: 1.0}
    rolled = torch.roll(source, 1, dims=0)  # own target orthogonal, tied with others
    assert precision_at_k(source, rolled, (1, 3, 4)) == {1: 0.0, 3: 0.0, 4: 1.0}
    with pytest.raises(ValueError, match="same shape"):
        precision_at_k(source, target[:3])


def test_retrieval_precision_over_the_whole_set(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    pairs = read_parallel(sample_file("parallel.en"), sample_file("parallel.de"))
    copies = [SentencePair(pair.source, pair.source) for pair in pairs]
    task, _ = task_and_mlm(len(tok))
    task.train()
    result = retrieval_precision(task, ParallelCollator(tok), copies, ks=(1, 3), batch_size=2)
    assert result == {1: 1.0, 3: 1.0}  # every sentence retrieves itself
    assert task.training
    assert retrieval_precision(task, ParallelCollator(tok), pairs, ks=(3,)) == {3: 1.0}


def test_alignment_loss_by_hand() -> None:
    vectors = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 2.0], [1.0, 1.0]])
    model, frozen = FixedEncoder(vectors), FixedEncoder(vectors)
    source = encoding([[1, 2]], [[0, 1]])
    target = encoding([[3, 0]], [[0, -1]])
    batch = ParallelBatch(source, target, torch.tensor([0, 1]), torch.tensor([0, 0]))
    with torch.no_grad():
        frozen.table.weight[1] = torch.tensor([1.0, 0.0])
    # pull: ‖(1,2)−(1,1)‖² + ‖(3,2)−(1,1)‖² = 1 + 5 over 2 links × 2 dims; stay: 4 / (2 × 2)
    loss = alignment_loss(model, frozen, batch, pull_weight=0.5, stay_weight=2.0)
    assert loss.item() == pytest.approx(0.5 * 6 / 4 + 2.0 * 4 / 4)
    default = alignment_loss(model, frozen, batch)
    assert default.item() == pytest.approx(0.01 * 6 / 4 + 1.0 * 4 / 4)
    no_links = ParallelBatch(
        source, target, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)
    )
    assert alignment_loss(model, frozen, no_links, stay_weight=0.0).item() == 0.0
    with pytest.raises(ValueError, match="pull_weight must be a finite number ≥ 0"):
        alignment_loss(model, frozen, batch, pull_weight=-1.0)
    with pytest.raises(ValueError, match="not the model"):
        alignment_loss(model, model, batch)


def test_alignment_loss_is_zero_for_the_frozen_copy_and_coinciding_pairs(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    pairs = read_parallel(sample_file("parallel.en"), sample_file("parallel.en"))
    same = [
        SentencePair(p.source, p.source, tuple((i, i) for i in range(len(p.source)))) for p in pairs
    ]
    batch = ParallelCollator(tok)(same)
    task, _ = task_and_mlm(len(tok))
    frozen = frozen_copy(task)
    assert alignment_loss(task, frozen, batch).item() == pytest.approx(0.0, abs=1e-10)
    assert alignment_loss(task, frozen, pairs_batch(tmp_path), stay_weight=0.0).item() > 1e-6
    with torch.no_grad():
        dict(task.named_parameters())["bert.encoder.layer.0.output.dense.weight"].add_(
            0.1 * torch.randn(16, 16)
        )
    assert alignment_loss(task, frozen, batch, pull_weight=0.0).item() > 1e-6


def test_alignment_refuses_the_model_itself_or_a_copy_on_another_device(tmp_path: Path) -> None:
    task, _ = task_and_mlm(len(tokenizer(tmp_path)))
    batch = pairs_batch(tmp_path)
    with pytest.raises(ValueError, match="copy of the model"):
        alignment_loss(task, task, batch)
    elsewhere: nn.Module = frozen_copy(task)
    elsewhere.to(torch.device("meta"))
    with pytest.raises(ValueError, match="frozen copy on meta"):
        alignment_loss(task, elsewhere, batch)


def test_the_frozen_copy_gets_no_gradient_and_never_moves(tmp_path: Path) -> None:
    task, _ = task_and_mlm(len(tokenizer(tmp_path)))
    frozen = BertForTokenClassification(config(len(tokenizer(tmp_path))))
    frozen.load_state_dict(task.state_dict())  # trainable on purpose: the loss must not train it
    before = [p.detach().clone() for p in frozen.parameters()]
    frozen.train()
    align = CrossLingualAlignment(frozen)
    opt = torch.optim.SGD(task.parameters(), lr=0.5)
    align(task, pairs_batch(tmp_path)).backward()
    opt.step()
    assert all(p.grad is None for p in frozen.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.parameters(), strict=True))
    assert frozen.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.parameters())


def task_loss(task: nn.Module, tok: object) -> torch.Tensor:
    words = torch.tensor([[2, 5, 6, 3]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 2, IGNORE_INDEX]])
    return task(input_ids=words, attention_mask=torch.ones_like(words), labels=labels).loss


def objectives(
    tmp_path: Path, name: str
) -> tuple[nn.Module, list[nn.Parameter], MemoryObjective, MemoryBatches[Any, Any]]:
    tok = tokenizer(tmp_path)
    task, mlm = task_and_mlm(len(tok))
    params = list(dict.fromkeys([*task.parameters(), *mlm.parameters()]))
    if name == "mlm":
        examples = text_examples(tok, read_text(sample_file("memory.en")))
        collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.5, seed=0)
        return (
            task,
            params,
            MaskedLM(head=mlm),
            MemoryBatches(examples, collator, batch_size=3, seed=0),
        )
    pairs = read_parallel(
        sample_file("parallel.en"), sample_file("parallel.de"), sample_file("parallel.en-de.align")
    )
    batches = MemoryBatches(pairs, ParallelCollator(tok), batch_size=2, seed=0)
    if name == "xsr":
        return task, params, SentenceRetrieval(), batches
    return task, params, CrossLingualAlignment(frozen_copy(task)), batches


def flat_grad(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            torch.zeros_like(p).flatten() if g is None else g.flatten()
            for p, g in zip(params, grads, strict=True)
        ]
    )


NAMES = ["mlm", "xsr", "align"]


@pytest.mark.parametrize("name", NAMES)
def test_objective_as_a_gem_constraint(tmp_path: Path, name: str) -> None:
    task, params, objective, batches = objectives(tmp_path, name)
    assert isinstance(objective, MemoryObjective)
    opt = GEMProjector(torch.optim.SGD(params, lr=0.1), margin=0.0, constraints=[name])
    batch = batches.sample()
    task_value, memory_value = task_loss(task, None), objective(task, batch)
    expected_dot = flat_grad(task_value, params) @ flat_grad(memory_value, params)
    opt.zero_grad()
    task_value.backward()
    with opt.constraint(name):
        memory_value.backward()
    opt.step()
    stats = opt.last_stats
    assert stats is not None
    assert stats.dots[0].item() == pytest.approx(expected_dot.item(), rel=1e-4, abs=1e-9)
    assert stats.dots_after[0].item() >= -1e-6 * stats.gram.abs().max().item()


@pytest.mark.parametrize("name", NAMES)
def test_objective_as_an_lfmlf_objective(tmp_path: Path, name: str) -> None:
    task, params, objective, batches = objectives(tmp_path, name)
    opt = ParetoLessForgetting(torch.optim.SGD(params, lr=0.1), objectives=["en", "de"])
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    opt.backward({"en": objective(task, batches.sample()), "de": objective(task, batches.sample())})
    opt.step()
    stats = opt.last_stats
    assert stats is not None and not stats.skipped and stats.gram is not None
    assert stats.weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (stats.dots >= -1e-6 * stats.gram.abs().max()).all()
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_objective_as_an_auxiliary_loss(tmp_path: Path, name: str) -> None:
    task, params, objective, batches = objectives(tmp_path, name)
    task_value, memory_value = task_loss(task, None), objective(task, batches.sample())
    expected = flat_grad(task_value, params) + 0.01 * flat_grad(memory_value, params)
    auxiliary_loss(task_value, memory_value).backward()
    got = torch.cat(
        [torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in params]
    )
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="alpha must be a finite number ≥ 0"):
        auxiliary_loss(task_value, memory_value, alpha=float("nan"))
    with pytest.raises(ValueError, match="0-d tensors"):
        auxiliary_loss(task_value, memory_value.reshape(1))


def test_masked_lm_needs_a_head_on_the_models_encoder(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    task, mlm = task_and_mlm(len(tok))
    other, _ = task_and_mlm(len(tok), seed=1)
    output = mlm.get_output_embeddings()
    assert isinstance(output, nn.Linear)
    assert output.weight is task.bert.embeddings.word_embeddings.weight  # tied again
    with pytest.raises(ValueError, match="has no base model to replace"):
        share_encoder(task.bert, task)
    batch = DataCollatorForLanguageModeling(tok, seed=0)(text_examples(tok, ["the dog"]))
    assert torch.equal(MaskedLM(head=mlm)(task, batch), MaskedLM()(mlm, batch))
    with pytest.raises(ValueError, match="does not share the encoder"):
        MaskedLM(head=mlm)(other, batch)


def test_a_sequence_classification_model_shares_its_encoder_with_an_mlm_model(
    tmp_path: Path,
) -> None:
    """Regression (issue 14): its encoder's pooler made share_encoder refuse the pair."""
    tok = tokenizer(tmp_path)
    torch.manual_seed(0)
    task = BertForSequenceClassification(config(len(tok)))
    mlm = share_encoder(BertForMaskedLM(config(len(tok))), task)
    assert mlm.bert is task.bert and task.bert.pooler is not None
    assert mlm.get_output_embeddings().weight is task.bert.embeddings.word_embeddings.weight
    batch = DataCollatorForLanguageModeling(tok, seed=0)(text_examples(tok, ["the dog"]))
    opt = GEMProjector(torch.optim.SGD(task.parameters(), lr=0.1), constraints=["mlm"])
    task(input_ids=batch["input_ids"], labels=torch.tensor([1])).loss.backward()
    with opt.constraint("mlm"):
        MaskedLM(head=mlm)(task, batch).backward()
    opt.step()
    assert opt.last_stats is not None and math.isfinite(opt.last_stats.to_dict()["gem/grad_norm"])
    with pytest.raises(ValueError, match=r"BertModel has pooler\.dense\.weight, which"):
        share_encoder(
            BertForSequenceClassification(config(len(tok))), BertForMaskedLM(config(len(tok)))
        )


def test_encoders_that_truly_differ_are_named_precisely(tmp_path: Path) -> None:
    task = BertForTokenClassification(config(40))
    with pytest.raises(ValueError, match=r"word_embeddings\.weight is \(30, 16\) in .* \(40, 16\)"):
        share_encoder(BertForMaskedLM(config(30)), task)
    with pytest.raises(ValueError, match="has a BertModel, Linear a Linear"):
        share_encoder(BertForMaskedLM(config(30)), nn.Linear(2, 2))


@given(
    n=st.integers(1, 8),
    dim=st.integers(2, 5),  # in one dimension every cosine is ±1: ties
    seed=st.integers(0, 2**16),
    k=st.integers(1, 9),
)
def test_precision_at_k_matches_sorting(n: int, dim: int, seed: int, k: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    target = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    similarity = (
        torch.nn.functional.normalize(source, dim=1)
        @ torch.nn.functional.normalize(target, dim=1).T
    )
    order = similarity.argsort(dim=1, descending=True, stable=True)
    hits = [i in order[i, :k].tolist() for i in range(n)]
    assert precision_at_k(source, target, (k,))[k] == pytest.approx(sum(hits) / n)


@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    words=st.integers(1, 5),
)
def test_word_pool_is_the_mean_of_each_words_subwords(
    lengths: list[int], seed: int, words: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    hidden = torch.randn(len(lengths), width, 3, generator=generator, dtype=torch.float64)
    index = torch.randint(-1, words, (len(lengths), width), generator=generator)
    pooled = word_pool(hidden, index, words)
    for word in range(words):
        members = hidden[index == word]
        expected = members.mean(dim=0) if len(members) else torch.zeros(3, dtype=torch.float64)
        torch.testing.assert_close(pooled[word], expected)

"""Tiny transformers encoders built from configs (no download), and a token-tagging loss."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForTokenClassification,
    DistilBertConfig,
    DistilBertForTokenClassification,
    RobertaConfig,
    RobertaForTokenClassification,
    XLMRobertaConfig,
    XLMRobertaForTokenClassification,
)

VOCAB, LABELS, TOKENS = 50, 3, 6


def bert(layers: int = 12, seed: int = 0, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=2,
        intermediate_size=11,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config.num_labels = LABELS
    return BertForTokenClassification(config)


def roberta(layers: int = 12, xlm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    settings: dict[str, Any] = {
        "num_hidden_layers": layers,
        "hidden_size": 8,
        "num_attention_heads": 2,
        "intermediate_size": 11,
        "vocab_size": VOCAB,
        "max_position_embeddings": 20,
    }
    if xlm:
        xlm_config = XLMRobertaConfig(**settings)
        xlm_config.num_labels = LABELS
        return XLMRobertaForTokenClassification(xlm_config)
    config = RobertaConfig(**settings)
    config.num_labels = LABELS
    return RobertaForTokenClassification(config)


def distilbert(layers: int = 12) -> nn.Module:
    torch.manual_seed(0)
    config = DistilBertConfig(
        n_layers=layers,
        dim=8,
        n_heads=2,
        hidden_dim=11,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        dropout=0.0,
        attention_dropout=0.0,
    )
    config.num_labels = LABELS
    return DistilBertForTokenClassification(config)


def batch(step: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(VOCAB, (size, TOKENS), generator=generator)
    return tokens, (tokens + tokens.roll(1, dims=1)) % LABELS


def tagging_loss(model: nn.Module, step: int, shift: int = 0) -> torch.Tensor:
    """The tagging loss on batch ``step``; ``shift`` relabels it (a conflicting "memory")."""
    tokens, labels = batch(step)
    loss: torch.Tensor = model(input_ids=tokens, labels=(labels + shift) % LABELS).loss
    return loss


@contextmanager
def one_thread() -> Iterator[None]:
    """Run on one CPU thread: tiny models are faster so, and do not fight other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

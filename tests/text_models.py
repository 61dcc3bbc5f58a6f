"""A tiny WordPiece tokenizer over the shipped sample files, and tiny BERT models (no download)."""

from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForTokenClassification,
    PreTrainedTokenizerBase,
)

from gradsurgery.objectives import share_encoder

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    *("the", "dog", "is", "walk", "##ing", "##s", "home", ".", "we", "see", "anna", "house"),
    *("big", "to", "new", "york", "acme", "ca", "n", "'", "t"),
    *("der", "hund", "geht", "nach", "hause", "wir", "sehen", "das", "haus", "ist", "gross"),
]


def tokenizer(tmp_path: Path) -> PreTrainedTokenizerBase:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + WORDS) + "\n", encoding="utf-8")
    # getattr: transformers v5 keeps BertTokenizerFast only as a runtime alias of BertTokenizer
    fast = getattr(transformers, "BertTokenizerFast")  # noqa: B009
    tok: PreTrainedTokenizerBase = fast.from_pretrained(str(tmp_path), do_lower_case=True)
    return tok


def config(vocab_size: int, labels: int = 3) -> BertConfig:
    bert = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    bert.num_labels = labels
    return bert


def task_and_mlm(
    vocab_size: int, seed: int = 0
) -> tuple[BertForTokenClassification, BertForMaskedLM]:
    """A token-classification model and a masked-LM model sharing its encoder."""
    torch.manual_seed(seed)
    task = BertForTokenClassification(config(vocab_size))
    mlm = share_encoder(BertForMaskedLM(config(vocab_size)), task)
    return task, mlm


class FixedEncoder(nn.Module):
    """An "encoder" whose hidden state at a position is a fixed vector per token id."""

    def __init__(self, vectors: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Embedding.from_pretrained(vectors.clone(), freeze=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)

"""Memory objectives of the papers, on a transformers model (work in progress)."""

from gradsurgery.objectives.encoders import (
    evaluating,
    frozen_copy,
    last_hidden_state,
    share_encoder,
)
from gradsurgery.objectives.mlm import mlm_loss, mlm_perplexity
from gradsurgery.objectives.pooling import mean_pool, word_pool

__all__ = [
    "evaluating",
    "frozen_copy",
    "last_hidden_state",
    "mean_pool",
    "mlm_loss",
    "mlm_perplexity",
    "share_encoder",
    "word_pool",
]

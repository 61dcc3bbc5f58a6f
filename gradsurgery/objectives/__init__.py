"""Memory objectives of the papers on a transformers model, and their evaluation.

- Masked LM on memory text: :func:`mlm_loss`, :func:`mlm_perplexity` (Liu et al., 2021).
- Cross-lingual sentence retrieval: :func:`xsr_loss`, :func:`retrieval_precision` (P@k).
- Cross-lingual alignment against a frozen copy: :func:`alignment_loss`, :func:`frozen_copy`
  (Cao et al., 2020; Efimov et al., 2022).
- One interface, ``objective(model, batch) -> loss``: :class:`MaskedLM`,
  :class:`SentenceRetrieval`, :class:`CrossLingualAlignment`, usable as a GEM constraint,
  an LF-MLF objective or, through :func:`auxiliary_loss`, an auxiliary loss.

Batches come from :mod:`gradsurgery.data` (e.g. :class:`~gradsurgery.data.MemoryBatches`).
See ``docs/objectives.md``.
"""

from gradsurgery.objectives.alignment import (
    DEFAULT_PULL_WEIGHT,
    DEFAULT_STAY_WEIGHT,
    alignment_loss,
    word_vectors,
)
from gradsurgery.objectives.encoders import (
    encoder_of,
    evaluating,
    frozen_copy,
    last_hidden_state,
    share_encoder,
)
from gradsurgery.objectives.memory import (
    DEFAULT_ALPHA,
    CrossLingualAlignment,
    MaskedLM,
    MemoryObjective,
    SentenceRetrieval,
    auxiliary_loss,
)
from gradsurgery.objectives.mlm import mlm_loss, mlm_perplexity
from gradsurgery.objectives.pooling import mean_pool, word_pool
from gradsurgery.objectives.xsr import (
    DEFAULT_TEMPERATURE,
    precision_at_k,
    retrieval_precision,
    sentence_vectors,
    xsr_loss,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_PULL_WEIGHT",
    "DEFAULT_STAY_WEIGHT",
    "DEFAULT_TEMPERATURE",
    "CrossLingualAlignment",
    "MaskedLM",
    "MemoryObjective",
    "SentenceRetrieval",
    "alignment_loss",
    "auxiliary_loss",
    "encoder_of",
    "evaluating",
    "frozen_copy",
    "last_hidden_state",
    "mean_pool",
    "mlm_loss",
    "mlm_perplexity",
    "precision_at_k",
    "retrieval_precision",
    "sentence_vectors",
    "share_encoder",
    "word_pool",
    "word_vectors",
    "xsr_loss",
]

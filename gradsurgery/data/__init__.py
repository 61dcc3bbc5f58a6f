"""Real data formats for fine-tuning and memory objectives, read from local files.

- Token classification: CoNLL-U (:func:`read_conllu`, part-of-speech tags) and CoNLL
  (:func:`read_conll`, named entities), as :class:`TaggedSentence` objects.
- Memory text for masked LM: :func:`read_text`, one sentence per line.
- Parallel text and word alignments: :func:`read_parallel` (two aligned files, and
  fast_align ``i-j`` output), as :class:`SentencePair` objects.
- Rows of a ``datasets.Dataset`` (or any mappings): :func:`tagged_from_records`,
  :func:`pairs_from_records`.
- Tokenization: :func:`tagging_examples` (labels on first sub-words),
  :func:`text_examples` (for ``DataCollatorForLanguageModeling``),
  :class:`ParallelCollator` (pairs → :class:`ParallelBatch`), :func:`encode_words`.
- :func:`sample_batch`, :class:`MemoryBatches`: a fresh random memory batch each step.
- :func:`sample_file`: tiny sample files of every format, shipped with the package.

Malformed input raises a ``ValueError`` that names the file and the line.
"""

from gradsurgery.data.encoding import (
    IGNORE_INDEX,
    ParallelBatch,
    ParallelCollator,
    WordEncoding,
    encode_words,
    tagging_examples,
    text_examples,
)
from gradsurgery.data.parallel import (
    SentencePair,
    pairs_from_records,
    parse_alignment,
    read_parallel,
)
from gradsurgery.data.sampling import DEFAULT_BATCH_SIZE, MemoryBatches, sample_batch
from gradsurgery.data.tagging import (
    UPOS_TAGS,
    TaggedSentence,
    read_conll,
    read_conllu,
    tag_vocabulary,
    tagged_from_records,
)
from gradsurgery.data.text import SAMPLES, read_text, sample_file

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "IGNORE_INDEX",
    "SAMPLES",
    "UPOS_TAGS",
    "MemoryBatches",
    "ParallelBatch",
    "ParallelCollator",
    "SentencePair",
    "TaggedSentence",
    "WordEncoding",
    "encode_words",
    "pairs_from_records",
    "parse_alignment",
    "read_conll",
    "read_conllu",
    "read_parallel",
    "read_text",
    "sample_batch",
    "sample_file",
    "tag_vocabulary",
    "tagged_from_records",
    "tagging_examples",
    "text_examples",
]

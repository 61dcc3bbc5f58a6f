"""Pre-train a tiny multilingual BERT with masked LM on the synthetic languages, and cache it.

The tokenizer is a word-level one built from the languages' words (plus BERT's special
tokens), written to disk next to the model. The corpus is monolingual text in every
language plus translation pairs joined into one sequence (``[CLS] x [SEP] y [SEP]``), as
XLM's translation LM does: the pairs are there to make the tiny model cross-lingual
in minutes (pre-training without them was not tried).

    python -m examples.crosslingual.pretrain --out examples/crosslingual/tiny-mbert

The example uses the copy shipped in ``examples/crosslingual/tiny-mbert`` (making it
took 217 s of wall time on 2 cores); without it, :func:`pretrained` makes it once and
then loads it from ``~/.cache/gradsurgery/crosslingual/<settings hash>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerFast,
)

from examples.crosslingual.languages import ANCHORS, Language, make_languages, parallel
from examples.crosslingual.languages import sentences as draw_sentences
from examples.crosslingual.languages import tagged as tag_sentences
from gradsurgery.data import text_examples

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CACHE = Path(os.environ.get("GRADSURGERY_CACHE", Path.home() / ".cache" / "gradsurgery"))


@dataclass(frozen=True)
class Settings:
    """Everything the checkpoint depends on (its cache key)."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    steps: int = 1200
    batch: int = 32
    lr: float = 2e-3
    sentences: int = 4000
    pairs: int = 2000
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + "v1"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_tokenizer(languages: list[Language]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every language's words and the anchors."""
    words = sorted({w for language in languages for w in language.spelling.values()})
    anchors = [w for group in ANCHORS.values() for w in group]
    vocab = {token: index for index, token in enumerate([*SPECIAL, *anchors, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def corpus(languages: list[Language], settings: Settings) -> list[str | tuple[str, str]]:
    """Monolingual sentences of every language, and translation pairs between them all."""
    texts: list[str | tuple[str, str]] = []
    for index, language in enumerate(languages):
        trees = draw_sentences(settings.sentences, seed=1000 + index)
        texts += [" ".join(s.words) for s in tag_sentences(trees, language)]
    trees = draw_sentences(settings.pairs, seed=2000)
    for index, tree in enumerate(trees):
        first, second = random.Random(index).sample(languages, 2)
        pair = parallel([tree], first, second)[0]
        texts.append((" ".join(pair.source), " ".join(pair.target)))
    return texts


def pretrain(out: Path, settings: Settings, *, verbose: bool = True) -> Path:
    """Pre-train the model and write it, with its tokenizer, to ``out``."""
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    languages = make_languages()
    tokenizer = build_tokenizer(languages)
    texts = corpus(languages, settings)
    single = text_examples(tokenizer, [t for t in texts if isinstance(t, str)])
    joined = tokenizer(
        [t[0] for t in texts if isinstance(t, tuple)],
        [t[1] for t in texts if isinstance(t, tuple)],
        return_special_tokens_mask=True,
    )
    examples = single + [
        {key: values[index] for key, values in joined.items()}
        for index in range(len(joined["input_ids"]))
    ]
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=settings.hidden,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        intermediate_size=4 * settings.hidden,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(config)
    collator = DataCollatorForLanguageModeling(tokenizer, seed=settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    warmup = settings.steps // 10
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 1.0) * (1 - s / settings.steps)
    )
    order = torch.Generator().manual_seed(settings.seed)
    model.train()
    for step in range(1, settings.steps + 1):
        chosen = torch.randint(len(examples), (settings.batch,), generator=order).tolist()
        batch = collator([examples[i] for i in chosen])
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if verbose and (step % 100 == 0 or step == settings.steps):
            print(f"pre-training step {step:5d}  MLM loss {loss.item():.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    if verbose:
        print(f"pre-trained in {time.perf_counter() - start:.0f} s → {out}", flush=True)
    return out


def pretrained(settings: Settings | None = None, cache: Path = CACHE) -> Path:
    """The cached checkpoint for ``settings`` (made first if it is not there yet)."""
    settings = settings or Settings()
    path = cache / "crosslingual" / settings.key()
    if (path / "settings.json").is_file():
        return path
    return pretrain(path, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write it (default: the cache)")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    args = parser.parse_args()
    settings = Settings(steps=args.steps)
    out = args.out or CACHE / "crosslingual" / settings.key()
    pretrain(out, settings)


if __name__ == "__main__":
    main()

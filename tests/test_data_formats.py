from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DataCollatorForLanguageModeling

from gradsurgery.data import (
    IGNORE_INDEX,
    SAMPLES,
    UPOS_TAGS,
    MemoryBatches,
    ParallelCollator,
    SentencePair,
    encode_words,
    pairs_from_records,
    read_conll,
    read_conllu,
    read_parallel,
    read_text,
    sample_file,
    tag_vocabulary,
    tagged_from_records,
    tagging_examples,
    text_examples,
)
from tests.text_models import tokenizer

CONLLU_LINE = "1\tdog\tdog\tNOUN\tNN\t_\t0\troot\t_\t_"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_every_sample_file_is_shipped() -> None:
    for name in SAMPLES:
        assert sample_file(name).is_file()
    memory = read_text(sample_file("memory.en"))
    assert len(memory) == 4 and memory[0] == "the dog is walking home ."
    with pytest.raises(ValueError, match=r"no sample file 'x\.txt'"):
        sample_file("x.txt")


def test_conllu_sample_keeps_words_and_upos_and_skips_ranges_and_empty_nodes() -> None:
    first, second = read_conllu(sample_file("en_pos.conllu"))
    assert first.words == ("The", "dog", "is", "walking", "home", ".")
    assert first.tags == ("DET", "NOUN", "AUX", "VERB", "ADV", "PUNCT")
    assert second.words == ("We", "ca", "n't", "see", "Anna", ".")  # not "can't", not "seen"
    assert set(first.tags + second.tags) <= set(UPOS_TAGS)


def test_conll_sample_takes_the_last_column_and_skips_docstart() -> None:
    first, second = read_conll(sample_file("en_ner.conll"))
    assert first.words == ("Anna", "walks", "to", "New", "York", ".")
    assert first.tags == ("B-PER", "O", "O", "B-LOC", "I-LOC", "O")
    assert second.tags == ("O", "O", "O", "B-ORG", "O")
    pos = read_conll(sample_file("en_ner.conll"), tag_column=1)
    assert pos[0].tags[:2] == ("NNP", "VBZ")
    assert tag_vocabulary([first, second]) == {
        "B-LOC": 0,
        "B-ORG": 1,
        "B-PER": 2,
        "I-LOC": 3,
        "O": 4,
    }


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (f"# c\n{CONLLU_LINE}\n1\tx\tx\tNOUN\n", 3, "expected 10 tab-separated columns, got 4"),
        (f"{CONLLU_LINE}\n{CONLLU_LINE}\n", 2, "expected word ID 2, got '1'"),
        (CONLLU_LINE.replace("NOUN", "NN") + "\n", 1, "UPOS 'NN' is not one of"),
    ],
)
def test_malformed_conllu_names_the_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write(tmp_path / "bad.conllu", text)
    with pytest.raises(ValueError, match=f"bad.conllu, line {line}: {message}"):
        read_conllu(path)


def test_malformed_conll_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.conll", "Anna NNP B-PER\nwalks O\n")
    with pytest.raises(ValueError, match=r"bad\.conll, line 2: expected 3 columns"):
        read_conll(path)
    with pytest.raises(ValueError, match=r"bad\.conll, line 2: expected a word and a tag"):
        read_conll(write(tmp_path / "bad.conll", "\nAnna\n"))
    with pytest.raises(ValueError, match="holds no sentence"):
        read_conll(write(tmp_path / "empty.conll", "\n-DOCSTART- O\n\n"))
    with pytest.raises(ValueError, match="tag_column must be a non-zero int"):
        read_conll(sample_file("en_ner.conll"), tag_column=0)


def test_parallel_sample_reads_pairs_and_links() -> None:
    pairs = read_parallel(
        sample_file("parallel.en"), sample_file("parallel.de"), sample_file("parallel.en-de.align")
    )
    assert len(pairs) == 3
    assert pairs[1] == SentencePair(
        ("we", "see", "anna", "."),
        ("wir", "sehen", "anna", "."),
        ((0, 0), (1, 1), (2, 2), (3, 3)),
    )
    assert read_parallel(sample_file("parallel.en"), sample_file("parallel.de"))[0].alignment == ()


def test_parallel_files_of_different_lengths_are_refused(tmp_path: Path) -> None:
    short = write(tmp_path / "short.de", "der hund\n")
    with pytest.raises(ValueError, match=r"parallel.en has 3 lines but .*short.de has 1"):
        read_parallel(sample_file("parallel.en"), short)


@pytest.mark.parametrize(
    ("links", "message"),
    [
        ("0-0 1-x", r"'1-x' is not a link i-j"),
        ("0-0 2-1", r"link 2-1 is outside the sentences: the source has 2 words"),
        ("0-0 0-0", "a link is given twice"),
    ],
)
def test_malformed_alignments_name_the_file_and_line(
    tmp_path: Path, links: str, message: str
) -> None:
    source = write(tmp_path / "a.en", "the dog\nthe house\n")
    target = write(tmp_path / "a.de", "der hund\ndas haus\n")
    align = write(tmp_path / "a.align", f"0-0 1-1\n{links}\n")
    with pytest.raises(ValueError, match=f"a.align, line 2: {message}"):
        read_parallel(source, target, align)


def test_empty_parallel_line_names_the_file_and_line(tmp_path: Path) -> None:
    source = write(tmp_path / "a.en", "the dog\n \n")
    target = write(tmp_path / "a.de", "der hund\ndas haus\n")
    with pytest.raises(ValueError, match=r"a\.en, line 2: empty sentence"):
        read_parallel(source, target)


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt: not UTF-8 text"):
        read_text(path)


def test_records_as_from_datasets() -> None:
    rows = [{"tokens": ["Anna", "walks"], "ner_tags": [1, 0]}]
    (sentence,) = tagged_from_records(rows, tags="ner_tags", tag_names=["O", "B-PER"])
    assert sentence.tags == ("B-PER", "O")
    with pytest.raises(ValueError, match="record 0 has int tags: pass their names"):
        tagged_from_records(rows, tags="ner_tags")
    (pair,) = pairs_from_records(
        [{"translation": {"en": "the dog", "de": "der hund"}}], source="en", target="de"
    )
    assert pair.target == ("der", "hund")
    with pytest.raises(ValueError, match="record 0: its 'translation' field has no 'en'"):
        pairs_from_records([{"translation": {"fr": "x"}}], source="en", target="de")


def test_labels_go_on_first_subwords_only(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    sentences = read_conllu(sample_file("en_pos.conllu"))
    tag_ids = {tag: index for index, tag in enumerate(UPOS_TAGS)}
    example = tagging_examples(tok, sentences, tag_ids)[0]
    pieces = tok.convert_ids_to_tokens(example["input_ids"])
    assert pieces == ["[CLS]", "the", "dog", "is", "walk", "##ing", "home", ".", "[SEP]"]
    expected = [IGNORE_INDEX] + [tag_ids[t] for t in ("DET", "NOUN", "AUX", "VERB")]
    expected += [IGNORE_INDEX, tag_ids["ADV"], tag_ids["PUNCT"], IGNORE_INDEX]
    assert example["labels"] == expected
    with pytest.raises(ValueError, match="sentence 0 has tags"):
        tagging_examples(tok, sentences, {"DET": 0})


def test_parallel_collator_numbers_words_and_maps_links(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    pairs = read_parallel(
        sample_file("parallel.en"), sample_file("parallel.de"), sample_file("parallel.en-de.align")
    )[:2]
    batch = ParallelCollator(tok)(pairs)
    assert len(batch) == 2
    assert batch.source.num_words == 6 + 4
    # "walking" is two sub-words of word 3; special tokens and padding belong to no word
    assert batch.source.word_index[0].tolist() == [-1, 0, 1, 2, 3, 3, 4, 5, -1]
    assert batch.source.word_index[1].tolist() == [-1, 6, 7, 8, 9, -1, -1, -1, -1]
    assert batch.source_words.tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    assert batch.target_words.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert encode_words(tok, [["the", "dog"]]).num_words == 2


def test_truncation_drops_links_to_cut_words(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    pair = SentencePair(("the", "dog", "home"), ("der", "hund", "hause"), ((0, 0), (2, 2)))
    batch = ParallelCollator(tok, max_length=4)([pair])  # [CLS] the dog [SEP]
    assert batch.source.num_words == 2
    assert batch.source_words.tolist() == [0]


def test_memory_batches_depend_only_on_seed_and_position(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    examples = text_examples(tok, read_text(sample_file("memory.en")))

    def stream(seed: int) -> MemoryBatches[Any, Any]:
        collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.5)  # global RNG
        return MemoryBatches(examples, collator, batch_size=2, seed=seed)

    first, second = stream(7), stream(7)
    rng_before = torch.get_rng_state()
    batches = [first.sample() for _ in range(4)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global generator is untouched
    torch.manual_seed(123)  # and does not matter
    for position in (3, 0, 2, 1):
        again = second.at(position)
        assert torch.equal(again["input_ids"], batches[position]["input_ids"])
        assert torch.equal(again["labels"], batches[position]["labels"])
    other = [stream(8).at(k)["labels"] for k in range(4)]
    assert any(not torch.equal(a, b["labels"]) for a, b in zip(other, batches, strict=True))
    assert all(b["input_ids"].shape[0] == 2 for b in batches)


def test_memory_batches_resume_and_iterate_from_the_start() -> None:
    draws = MemoryBatches(list(range(10)), list, batch_size=3, seed=1)
    ahead = [draws.sample() for _ in range(2)]
    state = draws.state_dict()
    later = [draws.sample() for _ in range(2)]
    resumed = MemoryBatches(list(range(10)), list, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.sample() for _ in range(2)] == later
    stream = iter(resumed)
    assert [next(stream) for _ in range(4)] == ahead + later  # a fresh pass starts at 0
    assert all(len(set(batch)) == 3 for batch in ahead + later)
    assert MemoryBatches([1, 2], list, batch_size=5).sample() in ([1, 2], [2, 1])
    with pytest.raises(ValueError, match="position ≥ 0"):
        draws.load_state_dict({"position": -1})
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        MemoryBatches([1], list, batch_size=0)
    with pytest.raises(ValueError, match="seed must be None or an int"):
        MemoryBatches([1], list, seed=-1)
    with pytest.raises(ValueError, match="no item"):
        MemoryBatches([], list)

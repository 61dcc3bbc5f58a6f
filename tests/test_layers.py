"""LayerSets: S_I ⊃ S_II, V_I ⊃ V_II hold exactly the parameters docs/phased_lr.md names."""

import math
import re

import pytest
import torch
from torch import nn

from gradsurgery.layers import PRESETS, SET_NAMES, EncoderLayout, LayerSets, split_layers
from tests.encoders import bert, distilbert, roberta


def spec_sets(names, layer_prefix, attention, feed_forward, slow, slow_key, fast):
    """The sets as docs/phased_lr.md words them, from the names: layer ranges, then sub-layers."""
    pattern = re.compile(rf"^{re.escape(layer_prefix)}(\d+)\.(.+)$")
    sets = {name: set() for name in SET_NAMES}
    for name in names:
        match = pattern.match(name)
        if match is None:
            sets["other"].add(name)
            continue
        index, rest = int(match[1]), match[2]
        module = rest.split(".")[0]
        if index in slow:
            sets["S_I"].add(name)
            if index in slow_key and module in feed_forward:
                sets["S_II"].add(name)
        if index in fast:
            sets["V_I"].add(name)
            if module in attention:
                sets["V_II"].add(name)
    return sets


def assert_sets(sets, expected):
    for name in SET_NAMES:
        assert set(sets.names(name)) == expected[name], name
    covered = set(sets.names("S_I")) | set(sets.names("V_I")) | set(sets.names("other"))
    assert len(covered) == sum(len(sets.names(n)) for n in ("S_I", "V_I", "other"))


BERT_PARTS = ({"attention"}, {"intermediate", "output"})
DISTILBERT_PARTS = ({"attention", "sa_layer_norm"}, {"ffn", "output_layer_norm"})


def test_a_12_layer_bert_gets_the_papers_sets():
    model = bert(12)
    sets = LayerSets.from_model(model)
    names = [name for name, _ in model.named_parameters()]
    expected = spec_sets(
        names, "bert.encoder.layer.", *BERT_PARTS, range(10), range(4), range(10, 12)
    )
    assert_sets(sets, expected)
    # every weight of a BERT layer is attention or feed-forward, biases and LayerNorms too
    assert len(sets.names("S_I")) == 10 * 16 and len(sets.names("V_I")) == 2 * 16
    assert len(sets.names("S_II")) == 4 * 6 and len(sets.names("V_II")) == 2 * 10
    assert "bert.encoder.layer.3.output.LayerNorm.bias" in sets.names("S_II")
    assert "bert.encoder.layer.4.output.dense.weight" not in sets.names("S_II")
    assert "bert.encoder.layer.11.attention.output.LayerNorm.weight" in sets.names("V_II")
    assert "bert.encoder.layer.11.intermediate.dense.weight" not in sets.names("V_II")
    assert set(sets.names("other")) == {
        name for name in names if "embeddings" in name or "classifier" in name
    }
    assert sets.layout is PRESETS["bert"] and sets.location == "bert.encoder.layer.{i}"


@pytest.mark.parametrize("xlm", [False, True], ids=["roberta", "xlm-roberta"])
def test_roberta_and_xlm_roberta(xlm):
    model = roberta(12, xlm=xlm)
    names = [name for name, _ in model.named_parameters()]
    expected = spec_sets(
        names, "roberta.encoder.layer.", *BERT_PARTS, range(10), range(4), range(10, 12)
    )
    assert_sets(LayerSets.from_model(model), expected)
    assert_sets(LayerSets.from_model(model, "xlm-roberta" if xlm else "roberta"), expected)


def test_distilbert():
    model = distilbert(12)
    names = [name for name, _ in model.named_parameters()]
    expected = spec_sets(
        names,
        "distilbert.transformer.layer.",
        *DISTILBERT_PARTS,
        range(10),
        range(4),
        range(10, 12),
    )
    sets = LayerSets.from_model(model)
    assert_sets(sets, expected)
    assert sets.layout.name == "distilbert"


@pytest.mark.parametrize(
    ("layers", "slow", "slow_key", "fast"),
    [(12, 10, 4, 2), (6, 5, 2, 1), (24, 20, 8, 4), (8, 6, 3, 2), (2, 1, 1, 1)],
)
def test_the_fractions_scale_with_depth(layers, slow, slow_key, fast):
    model = bert(layers)
    names = [name for name, _ in model.named_parameters()]
    expected = spec_sets(
        names,
        "bert.encoder.layer.",
        *BERT_PARTS,
        range(slow),
        range(slow_key),
        range(layers - fast, layers),
    )
    sets = LayerSets.from_model(model)
    assert_sets(sets, expected)
    assert sets.num_layers == layers


def test_the_rounding_and_the_overlap_rule():
    for depth in range(1, 97):
        split = split_layers(depth)
        fast = math.ceil(2 * depth / 12)
        assert list(split.fast) == list(range(depth - fast, depth))
        # S_I is every layer below V_I: the first ⌈10L/12⌉ unless that would overlap V_I
        assert list(split.slow) == list(range(min(math.ceil(10 * depth / 12), depth - fast)))
        assert list(split.slow_key) == list(range(min(math.ceil(4 * depth / 12), len(split.slow))))
        if depth % 6 == 0:  # no overlap: exactly the rounded-up fractions
            assert len(split.slow) == 10 * depth // 12 and len(split.slow_key) == depth // 3
        if depth >= 2:
            assert split.slow and split.slow_key and split.fast
    # L = 8: ⌈80/12⌉ = 7 and ⌈16/12⌉ = 2 both claim layer 6; it goes to V_I
    assert (split_layers(8).slow, split_layers(8).fast) == (range(6), range(6, 8))
    assert (split_layers(1).slow, split_layers(1).fast) == (range(0), range(1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(2, 2)
        self.mlp = nn.Linear(2, 2)
        self.norm = nn.LayerNorm(2)


class Stack(nn.Module):
    def __init__(self, depth, start=0):
        super().__init__()
        self.embed = nn.Embedding(3, 2)
        self.blocks = nn.ModuleDict({str(i): Block() for i in range(start, start + depth)})


GENERIC = EncoderLayout("blocks.{i}", attention=("attn",), feed_forward=("mlp",), name="toy")


def test_a_generic_layout_with_its_own_names():
    sets = LayerSets.from_model(Stack(6), GENERIC, num_layers=6)
    names = [name for name, _ in Stack(6).named_parameters()]
    expected = spec_sets(names, "blocks.", {"attn"}, {"mlp"}, range(5), range(2), range(5, 6))
    assert_sets(sets, expected)
    # a module that is neither sub-layer ("norm") is in S_I or V_I but not S_II or V_II
    assert "blocks.0.norm.weight" in sets.names("S_I")
    assert "blocks.5.norm.weight" in sets.names("V_I")
    assert "blocks.5.norm.weight" not in sets.names("V_II")


def test_roles_are_found_by_identity():
    model = bert(12)
    sets = LayerSets.from_model(model)
    layer = model.bert.encoder.layer
    assert sets.role(layer[0].intermediate.dense.weight) == "S_II"
    assert sets.role(layer[5].attention.self.query.bias) == "S_I"
    assert sets.role(layer[11].attention.self.key.weight) == "V_II"
    assert sets.role(layer[10].output.dense.weight) == "V_I"
    assert sets.role(model.classifier.weight) == "other"
    assert sets.role(torch.nn.Parameter(layer[0].intermediate.dense.weight.clone())) == "other"


def test_the_summary_says_where_everything_went():
    model = bert(12)
    sets = LayerSets.from_model(model)
    text = str(sets)
    lines = text.splitlines()
    assert lines[0] == "LayerSets: bert layout, 12 layers at 'bert.encoder.layer.{i}'"
    rows = {line.split()[0]: line for line in lines[2:]}
    numel = {name: p.numel() for name, p in model.named_parameters()}
    for name in SET_NAMES:
        tensors, elements = rows[name].split()[-2:]
        assert int(tensors) == len(sets.names(name))
        assert int(elements.replace(",", "")) == sum(numel[n] for n in sets.names(name))
    assert rows["S_I"].split()[1] == "0–9" and rows["S_II"].split()[1] == "0–3"
    assert rows["V_I"].split()[1] == "10–11" and rows["V_II"].split()[1] == "10–11"
    verbose = sets.summary(verbose=True).splitlines()[len(lines) :]
    assert len(verbose) == len(numel)
    assert "  S_II  bert.encoder.layer.0.intermediate.dense.weight" in verbose


# -- layouts that do not fit -----------------------------------------------------------


def test_a_preset_that_does_not_match_names_what_it_expected():
    with pytest.raises(
        ValueError, match=r"bert layout expects parameters named like 'encoder\.layer\.\{i\}"
    ):
        LayerSets.from_model(distilbert(2), "bert")
    with pytest.raises(ValueError, match=r"'transformer\.layer\.\{i\}"):
        LayerSets.from_model(bert(2), "distilbert")


def test_no_detectable_layout():
    with pytest.raises(ValueError, match=r"no encoder layout detected.*'encoder\.layer\.\{i\}"):
        LayerSets.from_model(nn.Linear(2, 2))


def test_a_layout_whose_layers_lack_a_sub_layer():
    class XLNetLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.Module()
            self.transformer.layer = nn.ModuleList()
            for _ in range(2):
                layer = nn.Module()
                layer.rel_attn, layer.ff = nn.Linear(2, 2), nn.Linear(2, 2)
                self.transformer.layer.append(layer)

    with pytest.raises(
        ValueError, match=r"expects attention parameters under.*only modules \['ff', 'rel_attn'\]"
    ):
        LayerSets.from_model(XLNetLike())


def test_two_encoders_gaps_and_a_wrong_depth():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = Stack(2), Stack(2)

    with pytest.raises(ValueError, match="several encoders"):
        LayerSets.from_model(Two(), GENERIC)
    with pytest.raises(ValueError, match=r"are \[1, 2\]; expected 0 … 2 without gaps"):
        LayerSets.from_model(Stack(2, start=1), GENERIC)
    with pytest.raises(
        ValueError, match=re.escape("num_layers is 4 but 'blocks.{i}' has 6 layers")
    ):
        LayerSets.from_model(Stack(6), GENERIC, num_layers=4)


def test_unknown_presets_and_bad_layouts():
    with pytest.raises(ValueError, match=r"unknown layout preset 'gpt2'; the presets are \["):
        LayerSets.from_model(bert(2), "gpt2")
    with pytest.raises(TypeError, match="layout must be"):
        LayerSets.from_model(bert(2), 3)
    bad = [
        (("encoder.layer",), "one '{i}'"),
        (("layer.{i}.{i}",), "one '{i}'"),
        (("layer..{i}",), "one '{i}'"),
        (("layer.{i}", ()), "at least one"),
        (("layer.{i}", ("a",), ("a", "b")), r"\['a'\] are in both"),
        (("layer.{i}", "attn"), "must be dotted module paths"),
    ]
    for args, message in bad:
        args = args + (("attn",), ("mlp",))[len(args) - 1 :]
        with pytest.raises(ValueError, match=message):
            EncoderLayout(*args)


def test_a_parameter_under_both_sub_layers_is_refused():
    layout = EncoderLayout("blocks.{i}", ("attn",), ("attn.inner",))
    with pytest.raises(ValueError, match="under both"):
        layout.sub_layer("attn.inner.weight")


def test_names_of_an_unknown_set():
    with pytest.raises(ValueError, match=r"unknown set 'S_III'; the sets are \['S_I'"):
        LayerSets.from_model(bert(2)).names("S_III")

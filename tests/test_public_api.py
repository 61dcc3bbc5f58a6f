"""The public API: every name listed here stays importable (removing one fails), and the
wrappers show their settings in ``repr``.

Adding a public name: add it to the module's ``__all__``, to this list and to the
changelog. Removing or renaming one follows the deprecation policy (docs/api.md).
"""

import importlib
import pkgutil
import re

import pytest
import torch

import gradsurgery
from gradsurgery import (
    MGDA,
    GEMProjector,
    GradVac,
    ParetoLessForgetting,
    PCGrad,
    PhasedLR,
    Uniform,
)
from tests.encoders import bert

PUBLIC = {
    "gradsurgery": [
        "CKAMonitor",
        "EncoderLayout",
        "GEMProjector",
        "GEMStats",
        "GradVac",
        "GradientBank",
        "LayerSets",
        "MGDA",
        "MultiObjectiveOptimizer",
        "NonFiniteGradientError",
        "ObjectiveStats",
        "PCGrad",
        "ParetoLessForgetting",
        "ParetoStationaryError",
        "Phase",
        "PhaseDetector",
        "PhasedLR",
        "PhasedStats",
        "SolverError",
        "StepStats",
        "SurgeryOptimizer",
        "Uniform",
        "WrappedOptimizer",
        "__version__",
        "cite",
        "distributed",
        "functional",
        "papers",
        "qp",
    ],
    "gradsurgery.distributed": ["Distributed", "Replicated", "Sharded"],
    "gradsurgery.objectives": [
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
        "frozen_copy",
        "mlm_loss",
        "mlm_perplexity",
        "precision_at_k",
        "retrieval_precision",
        "sentence_vectors",
        "share_encoder",
        "word_vectors",
        "xsr_loss",
    ],
    "gradsurgery.data": [
        "MemoryBatches",
        "ParallelBatch",
        "ParallelCollator",
        "SentencePair",
        "TaggedSentence",
        "encode_words",
        "parse_alignment",
        "read_conll",
        "read_conllu",
        "read_parallel",
        "read_text",
        "sample_file",
        "tagging_examples",
        "text_examples",
    ],
    "gradsurgery.functional": [
        "GEMSolution",
        "conflict_orders",
        "gem_multipliers",
        "gem_project",
        "gradvac_weights",
        "lfmlf_weights",
        "mgda_weights",
        "pcgrad_weights",
        "uniform_weights",
    ],
    "gradsurgery.episodic": ["ReservoirMemory", "RingMemory"],
    "gradsurgery.errors": ["NonFiniteGradientError", "ParetoStationaryError", "SolverError"],
    "gradsurgery.citation": ["LIBRARY_BIBTEX", "cite", "methods"],
    "gradsurgery.papers": [
        "CHAUDHRY_2019",
        "EFIMOV_2022",
        "GUO_2023",
        "LIU_2021",
        "LOPEZ_PAZ_2017",
        "MAO_2022",
        "PAPERS",
        "Paper",
        "SENER_2018",
        "WANG_2021",
        "YU_2020",
    ],
    "gradsurgery.qp": ["KKT_TOLERANCE", "QPSolution", "solve_lower_bounded", "kkt_residual"],
    "gradsurgery.layers": ["PRESETS", "SET_NAMES", "EncoderLayout", "LayerSets"],
    "gradsurgery.phases": ["Phase", "PhaseDetector"],
    "gradsurgery.similarity": ["CKAMonitor", "linear_cka"],
    "gradsurgery.flat": ["GradientBank"],
    "gradsurgery.segments": ["Segments", "segment_gram", "combine_segments_"],
    "gradsurgery.integrations.transformers": ["SurgeryTrainer"],
    "gradsurgery.wrappers": [
        "GEMProjector",
        "GEMStats",
        "GradVac",
        "MGDA",
        "MultiObjectiveOptimizer",
        "ObjectiveStats",
        "PCGrad",
        "ParetoLessForgetting",
        "PhasedLR",
        "PhasedStats",
        "StepStats",
        "SurgeryOptimizer",
        "Uniform",
        "WrappedOptimizer",
    ],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_every_public_name_is_still_exported(module_name):
    module = importlib.import_module(module_name)
    missing = sorted(set(PUBLIC[module_name]) - set(module.__all__))
    assert not missing, f"{module_name} no longer exports {missing}"
    for name in PUBLIC[module_name]:
        assert getattr(module, name) is not None


def test_every_module_declares_all_and_all_names_exist():
    for info in pkgutil.walk_packages(gradsurgery.__path__, "gradsurgery."):
        module = importlib.import_module(info.name)
        assert isinstance(module.__all__, list), info.name
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.__all__ names {name!r}, not defined"
        assert len(set(module.__all__)) == len(module.__all__), info.name


def test_version_is_a_canonical_pep440_release_or_pre_release():
    pattern = r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?"
    assert re.fullmatch(pattern, gradsurgery.__version__), gradsurgery.__version__


def _linear_sgd():
    return torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.25, momentum=0.5)


WRAPPERS = {
    "GEMProjector": (
        lambda: GEMProjector(_linear_sgd(), 0.5, constraints=["mlm", "xsr"], mode="agem"),
        ["margin=0.5", "constraints=['mlm', 'xsr']", "mode='agem'", "solver='auto'"],
    ),
    "ParetoLessForgetting": (
        lambda: ParetoLessForgetting(_linear_sgd(), objectives=["en", "de"]),
        ["objectives=['en', 'de']", "solver='daqp'"],
    ),
    "Uniform": (lambda: Uniform(_linear_sgd(), objectives=3), ["objectives=['0', '1', '2']"]),
    "PCGrad": (
        lambda: PCGrad(_linear_sgd(), objectives=2, reduction="mean"),
        ["objectives=['0', '1']", "reduction='mean'"],
    ),
    "GradVac": (
        lambda: GradVac(_linear_sgd(), objectives=2, beta=0.25, granularity="parameter"),
        ["beta=0.25", "granularity='parameter'"],
    ),
    "MGDA": (lambda: MGDA(_linear_sgd(), objectives=2), ["objectives=['0', '1']", "solver="]),
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_repr_shows_settings_and_the_inner_optimizer(name):
    make, expected = WRAPPERS[name]
    opt = make()
    text = repr(opt)
    assert text.startswith(f"{name}(")
    for setting in expected:
        assert setting in text, (setting, text)
    assert repr(opt.optimizer).split("\n")[0] in text
    assert "lr: 0.25" in text and "momentum: 0.5" in text


def test_repr_of_phased_lr_and_of_a_stack_nests_the_inner_reprs():
    model = bert(layers=2)
    gem = GEMProjector(
        torch.optim.AdamW(model.parameters(), lr=1e-3), margin=0.0, constraints=["mlm"]
    )
    opt = PhasedLR(gem, model, c1=0.05, c2=None, window=7)
    text = repr(opt)
    assert text.startswith("PhasedLR(")
    for setting in ("c1=0.05", "c2=None", "window=7"):
        assert setting in text, text
    assert "GEMProjector(margin=0.0, constraints=['mlm']" in text
    assert "AdamW (" in text

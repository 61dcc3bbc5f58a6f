"""gradsurgery: ``torch.optim`` wrappers that do gradient surgery against forgetting.

Wrap any optimizer in one line; the wrapper rewrites the gradient (or the learning rate of
each layer set) before the inner optimizer steps:

>>> import torch
>>> from gradsurgery import GEMProjector
>>> model = torch.nn.Linear(4, 2)
>>> opt = GEMProjector(torch.optim.SGD(model.parameters(), lr=0.1), constraints=["memory"])
"""

from gradsurgery import distributed, functional, papers, qp
from gradsurgery._version import __version__
from gradsurgery.citation import cite
from gradsurgery.errors import NonFiniteGradientError, ParetoStationaryError, SolverError
from gradsurgery.flat import GradientBank
from gradsurgery.layers import EncoderLayout, LayerSets
from gradsurgery.phases import Phase, PhaseDetector
from gradsurgery.similarity import CKAMonitor
from gradsurgery.wrappers import (
    MGDA,
    GEMProjector,
    GEMStats,
    GradVac,
    MultiObjectiveOptimizer,
    ObjectiveStats,
    ParetoLessForgetting,
    PCGrad,
    PhasedLR,
    PhasedStats,
    StepStats,
    SurgeryOptimizer,
    Uniform,
    WrappedOptimizer,
)

__all__ = [
    "MGDA",
    "CKAMonitor",
    "EncoderLayout",
    "GEMProjector",
    "GEMStats",
    "GradVac",
    "GradientBank",
    "LayerSets",
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
]

"""gradsurgery: ``torch.optim`` wrappers that do gradient surgery against forgetting.

Wrap any optimizer in one line; the wrapper rewrites the gradient before the inner
optimizer steps:

>>> import torch
>>> from gradsurgery import GEMProjector
>>> model = torch.nn.Linear(4, 2)
>>> opt = GEMProjector(torch.optim.SGD(model.parameters(), lr=0.1), constraints=["memory"])
"""

from gradsurgery import functional, qp
from gradsurgery.errors import NonFiniteGradientError, ParetoStationaryError, SolverError
from gradsurgery.flat import GradientBank
from gradsurgery.wrappers import (
    MGDA,
    GEMProjector,
    GEMStats,
    GradVac,
    MultiObjectiveOptimizer,
    ObjectiveStats,
    ParetoLessForgetting,
    PCGrad,
    StepStats,
    SurgeryOptimizer,
    Uniform,
    WrappedOptimizer,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "MGDA",
    "GEMProjector",
    "GEMStats",
    "GradVac",
    "GradientBank",
    "MultiObjectiveOptimizer",
    "NonFiniteGradientError",
    "ObjectiveStats",
    "PCGrad",
    "ParetoLessForgetting",
    "ParetoStationaryError",
    "SolverError",
    "StepStats",
    "SurgeryOptimizer",
    "Uniform",
    "WrappedOptimizer",
    "__version__",
    "functional",
    "qp",
]

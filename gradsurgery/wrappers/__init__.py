"""Optimizer wrappers: each changes what the optimizer it wraps does in a step."""

from gradsurgery.wrappers.gem import GEMProjector, GEMStats
from gradsurgery.wrappers.gradvac import GradVac
from gradsurgery.wrappers.lfmlf import ParetoLessForgetting
from gradsurgery.wrappers.mgda import MGDA
from gradsurgery.wrappers.multi import MultiObjectiveOptimizer, ObjectiveStats
from gradsurgery.wrappers.pcgrad import PCGrad
from gradsurgery.wrappers.phased import PhasedLR, PhasedStats
from gradsurgery.wrappers.surgery import StepStats, SurgeryOptimizer
from gradsurgery.wrappers.uniform import Uniform
from gradsurgery.wrappers.wrapped import WrappedOptimizer

__all__ = [
    "MGDA",
    "GEMProjector",
    "GEMStats",
    "GradVac",
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
]

"""Optimizer wrappers: each changes what the optimizer it wraps does in a step."""

from gradsurgery.wrappers.gem import GEMProjector, GEMStats
from gradsurgery.wrappers.phased import PhasedLR, PhasedStats
from gradsurgery.wrappers.surgery import StepStats, SurgeryOptimizer
from gradsurgery.wrappers.wrapped import WrappedOptimizer

__all__ = [
    "GEMProjector",
    "GEMStats",
    "PhasedLR",
    "PhasedStats",
    "StepStats",
    "SurgeryOptimizer",
    "WrappedOptimizer",
]

"""Optimizer wrappers: each rewrites ``.grad`` before the optimizer it wraps steps."""

from gradsurgery.wrappers.gem import GEMProjector, GEMStats
from gradsurgery.wrappers.surgery import StepStats, SurgeryOptimizer
from gradsurgery.wrappers.wrapped import WrappedOptimizer

__all__ = ["GEMProjector", "GEMStats", "StepStats", "SurgeryOptimizer", "WrappedOptimizer"]

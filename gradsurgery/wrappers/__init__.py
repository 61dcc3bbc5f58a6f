"""Optimizer wrappers: each rewrites ``.grad`` before the optimizer it wraps steps."""

from gradsurgery.wrappers.base import StepStats, SurgeryOptimizer
from gradsurgery.wrappers.gem import GEMProjector, GEMStats

__all__ = ["GEMProjector", "GEMStats", "StepStats", "SurgeryOptimizer"]

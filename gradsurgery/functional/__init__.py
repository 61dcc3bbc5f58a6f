"""Stateless forms of the gradient surgeries: tensors in, tensors out."""

from gradsurgery.functional.gem import GEMSolution, gem_multipliers, gem_project

__all__ = ["GEMSolution", "gem_multipliers", "gem_project"]

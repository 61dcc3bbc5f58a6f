"""Stateless forms of the gradient surgeries: tensors in, tensors out.

GEM returns the projected gradient; the multi-objective methods return the weights ``w``
of their combination ``d = gradsᵀ w`` of the ``(T, p)`` gradients.
"""

from gradsurgery.functional.gem import GEMSolution, gem_multipliers, gem_project
from gradsurgery.functional.gradvac import gradvac_weights
from gradsurgery.functional.lfmlf import lfmlf_weights
from gradsurgery.functional.mgda import mgda_weights
from gradsurgery.functional.pcgrad import conflict_orders, pcgrad_weights
from gradsurgery.functional.uniform import uniform_weights

__all__ = [
    "GEMSolution",
    "conflict_orders",
    "gem_multipliers",
    "gem_project",
    "gradvac_weights",
    "lfmlf_weights",
    "mgda_weights",
    "pcgrad_weights",
    "uniform_weights",
]

"""Hypothesis strategies for projection problems."""

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st


@dataclass
class Problem:
    g: torch.Tensor
    J: torch.Tensor

    @property
    def t(self) -> int:
        return self.J.shape[0]


@st.composite
def problems(
    draw: st.DrawFn,
    max_t: int = 8,
    min_p: int = 1,
    max_p: int = 48,
    min_exponent: int = -6,
    max_exponent: int = 3,
    dtype: torch.dtype = torch.float64,
) -> Problem:
    """A task gradient and ``t`` constraint rows, each of its own scale in [1e-6, 1e3].

    About half of the problems are built so that several constraints are violated; some
    have duplicated or zero rows, or more constraints than dimensions.
    """
    t = draw(st.integers(1, max_t))
    p = draw(st.integers(min_p, max_p))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    exponents = rng.uniform(min_exponent, max_exponent, size=t + 1)
    J = rng.standard_normal((t, p)) * 10.0 ** exponents[1:, None]
    structure = draw(st.sampled_from(["random", "conflict", "duplicate", "zero_row"]))
    if structure == "duplicate" and t > 1:
        J[-1] = J[0] * 10.0 ** rng.uniform(-1, 1)
    if structure == "zero_row" and t > 1:
        J[-1] = 0.0
    g = rng.standard_normal(p)
    if structure == "conflict":
        g -= (J / np.linalg.norm(J, axis=1, keepdims=True).clip(1e-300)).sum(axis=0)
    g *= 10.0 ** exponents[0] / max(np.linalg.norm(g), 1e-300)
    return Problem(torch.tensor(g, dtype=dtype), torch.tensor(J, dtype=dtype))

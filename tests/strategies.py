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


DEPENDENT_KINDS = ("low_rank", "integer", "duplicated_negated", "zero_cone", "more_rows")


@st.composite
def dependent_problems(
    draw: st.DrawFn,
    max_t: int = 8,
    max_p: int = 60,
    kinds: tuple[str, ...] = DEPENDENT_KINDS,
) -> Problem:
    """Float64 problems whose constraint rows are linearly dependent.

    ``low_rank``: ``J = A B`` with ``A`` of shape ``(t, r)``, ``r < t`` (rounding leaves the
    rows dependent to ~1e-16 only); ``integer``: entries in ``[-3, 3]`` in 2-4 dimensions
    with up to ``max_t`` rows (exactly dependent, many tied active sets); ``duplicated_negated``:
    rows repeated with positive factors and negated; ``zero_cone``: ``±`` a spanning set, so
    that the only feasible point is 0; ``more_rows``: ``t > p`` random rows. The task
    gradient usually conflicts with several rows; rows and gradient get scales in
    ``[1e-6, 1e3]`` (powers of two for ``integer``, which stays exact).
    """
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    t = int(rng.integers(2, max_t + 1))
    if kind == "integer":
        p = int(rng.integers(2, 5))
        J = rng.integers(-3, 4, size=(t, p)).astype(np.float64)
        g = rng.integers(-5, 6, size=p).astype(np.float64)
        J *= 2.0 ** rng.integers(-20, 10, size=(t, 1))
        g *= 2.0 ** int(rng.integers(-20, 10))
        return Problem(torch.tensor(g), torch.tensor(J))
    if kind == "low_rank":
        p = int(rng.integers(1, max_p + 1))
        rank = int(rng.integers(1, t))
        J = rng.standard_normal((t, rank)) @ rng.standard_normal((rank, p))
    elif kind == "duplicated_negated":
        p = int(rng.integers(1, max_p + 1))
        base = rng.standard_normal((max(1, t // 2), p))
        picks = rng.integers(0, len(base), size=t)
        signs = np.where(rng.random(t) < 0.5, -1.0, 1.0)
        J = base[picks] * (signs * 10.0 ** rng.uniform(-1, 1, size=t))[:, None]
    elif kind == "zero_cone":
        p = int(rng.integers(1, max_t // 2 + 1))
        basis = rng.standard_normal((p, p))
        extra = rng.standard_normal((t - 2 * p, p)) if t > 2 * p else np.zeros((0, p))
        J = np.vstack([basis, -basis, extra])
        t = len(J)
    else:
        p = int(rng.integers(1, t))
        J = rng.standard_normal((t, p))
    J *= 10.0 ** rng.uniform(-6, 3, size=(t, 1))
    g = rng.standard_normal(p)
    norms = np.linalg.norm(J, axis=1, keepdims=True).clip(1e-300)
    if rng.random() < 0.7:
        g -= (J / norms).sum(axis=0)
    g *= 10.0 ** rng.uniform(-6, 3) / max(np.linalg.norm(g), 1e-300)
    return Problem(torch.tensor(g), torch.tensor(J))

"""The functional forms refuse inputs that require grad (their solves are not differentiable).

Before, with such inputs: gem_project returned a wrong derivative when t > p, mgda_weights
NaN, pcgrad_weights an in-place autograd error, lfmlf_weights a silently detached result.
"""

from collections.abc import Callable

import pytest
import torch

from gradsurgery import gram
from gradsurgery.functional import (
    gem_multipliers,
    gem_project,
    gradvac_weights,
    lfmlf_weights,
    mgda_weights,
    pcgrad_weights,
    uniform_weights,
)

T, P = 4, 3  # more rows than dimensions: dependent rows


def grads() -> torch.Tensor:
    torch.manual_seed(0)
    g = torch.randn(T, P, dtype=torch.float64)
    g[1] = -g[0]  # a conflict
    return g


def stacked_gram(rows: torch.Tensor) -> torch.Tensor:
    return gram.gram(rows)


# name of the function, the argument made to require grad, and how to call it
CALLS: list[tuple[str, str, Callable[[dict[str, torch.Tensor]], object]]] = [
    ("gem_project", "grad", lambda a: gem_project(a["grad"], a["constraints"])),
    ("gem_project", "constraints", lambda a: gem_project(a["grad"], a["constraints"])),
    ("gem_multipliers", "gram", lambda a: gem_multipliers(a["gram"])),
    ("mgda_weights", "grads", lambda a: mgda_weights(a["grads"])),
    ("pcgrad_weights", "grads", lambda a: pcgrad_weights(a["grads"])),
    ("uniform_weights", "grads", lambda a: uniform_weights(a["grads"])),
    ("gradvac_weights", "grads", lambda a: gradvac_weights(a["grads"], a["targets"])),
    ("gradvac_weights", "targets", lambda a: gradvac_weights(a["grads"], a["targets"])),
    ("lfmlf_weights", "grads", lambda a: lfmlf_weights(a["grads"], a["accumulated"])),
    ("lfmlf_weights", "accumulated", lambda a: lfmlf_weights(a["grads"], a["accumulated"])),
]


def inputs(requiring: str | None) -> dict[str, torch.Tensor]:
    rows = grads()
    values = {
        "grad": rows[0],
        "constraints": rows[1:],
        "gram": stacked_gram(rows),
        "grads": rows,
        "targets": torch.zeros(T, T, dtype=torch.float64),
        "accumulated": -rows.sum(dim=0),
    }
    if requiring is not None:
        values[requiring] = values[requiring].clone().requires_grad_()
    return values


@pytest.mark.parametrize(("function", "argument", "call"), CALLS)
def test_an_input_that_requires_grad_is_refused_with_the_fix(function, argument, call):
    with pytest.raises(ValueError, match=rf"{function}: {argument} requires grad.*\.detach\(\)"):
        call(inputs(argument))


@pytest.mark.parametrize(("function", "argument", "call"), CALLS)
def test_no_grad_mode_or_detached_inputs_are_accepted(function, argument, call):
    expected = call(inputs(None))
    with torch.no_grad():
        under_no_grad = call(inputs(argument))
    detached = call({k: v.detach() for k, v in inputs(argument).items()})
    for result in (under_no_grad, detached):
        assert type(result) is type(expected)
        for got, want in zip(
            result if isinstance(result, tuple) else (result,),
            expected if isinstance(expected, tuple) else (expected,),
            strict=True,
        ):
            assert torch.equal(got, want)

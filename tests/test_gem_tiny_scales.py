"""GEM with gradients so small that their fp32 Gram underflows (regressions and properties)."""

import numpy as np
import pytest
import torch
from hypothesis import given

from gradsurgery import MGDA, GEMProjector, ParetoLessForgetting
from gradsurgery import gram as gram_module
from gradsurgery.functional import gem_project, lfmlf_weights, mgda_weights
from tests import reference
from tests.strategies import Problem, problems

P = 1000


def conflicting_pair(scale_g: float, scale_1: float, dtype: torch.dtype) -> Problem:
    """A task gradient and one memory gradient at cosine -0.92, of the given norms."""
    rng = np.random.default_rng(0)
    g_1 = rng.standard_normal(P)
    g_1 /= np.linalg.norm(g_1)
    other = rng.standard_normal(P)
    other -= (other @ g_1) * g_1
    g = -0.92 * g_1 + np.sqrt(1 - 0.92**2) * other / np.linalg.norm(other)
    return Problem(
        torch.tensor(g * scale_g, dtype=dtype), torch.tensor(g_1[None] * scale_1, dtype=dtype)
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def wrapper_step(problem: Problem) -> torch.Tensor:
    """What a GEMProjector around SGD(lr=1) subtracts from the parameters."""
    weight = torch.nn.Parameter(torch.zeros(P, dtype=problem.g.dtype))
    opt = GEMProjector(torch.optim.SGD([weight], lr=1.0), 0.0)
    (weight * problem.g).sum().backward()
    with opt.constraint():
        (weight * problem.J[0]).sum().backward()
    opt.step()
    assert opt.last_stats is not None
    assert bool(opt.last_stats.projected)
    return -weight.detach()


CASES = {
    "both_near_1e-30": (1e-30, 1e-30),
    "memory_gradient_1e-25": (1.0, 1e-25),
    "task_gradient_1e-25": (1e-25, 1.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_a_conflict_between_tiny_gradients_is_projected(case, dtype):
    problem = conflicting_pair(*CASES[case], dtype)
    assert cosine(problem.g, problem.J[0]) < -0.9
    # the squared norm of a tiny gradient underflows to 0 in fp32 accumulation
    assert float(gram_module.gram(torch.cat([problem.g[None], problem.J])).diagonal().min()) == 0
    for x in (gem_project(problem.g, problem.J), wrapper_step(problem)):
        assert x.dtype == dtype
        # exact up to the rounding of x to the gradients' dtype
        assert cosine(x, problem.J[0]) >= -4 * torch.finfo(dtype).eps


@given(problems(max_p=200, min_exponent=-32, max_exponent=-18, dtype=torch.float32))
def test_tiny_float32_gradients_agree_with_the_reference(problem):
    x = gem_project(problem.g, problem.J)
    g, J = problem.g.double().numpy(), problem.J.double().numpy()
    x_ref = reference.project(g, J)
    v = np.linalg.lstsq(J.T, x_ref - g, rcond=None)[0] if np.any(x_ref != g) else 0 * J[:, 0]
    term_scale = np.linalg.norm(g) + np.sum(np.abs(v) * np.linalg.norm(J, axis=1))
    assert np.linalg.norm(x.double().numpy() - x_ref) <= 1e-4 * term_scale


def test_exact_gram_matches_float64_for_rows_of_any_scale():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((4, 3000)) * np.array([[1e-42], [1e-30], [1.0], [1e15]])
    block = torch.tensor(rows, dtype=torch.float32)
    expected = block.double() @ block.double().T
    exact = gram_module.exact_gram(block)
    assert torch.allclose(exact, expected, rtol=1e-12, atol=0)
    assert float(gram_module.gram(block)[1, 1]) == 0.0  # what the fp32 product gives


def test_underflow_is_suspected_from_the_diagonal_only():
    normal = torch.randn(3, P)
    assert not bool(gram_module.underflow_suspected(gram_module.gram(normal), P, [normal.dtype]))
    tiny = normal * 1e-20
    assert bool(gram_module.underflow_suspected(gram_module.gram(tiny), P, [tiny.dtype]))
    # float64 accumulation has the range for these
    assert not bool(
        gram_module.underflow_suspected(gram_module.gram(tiny.double()), P, [torch.float64])
    )


def test_normal_gradients_take_no_extra_pass(monkeypatch):
    def forbidden(block: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the exact Gram was computed for normal gradients")

    monkeypatch.setattr(gram_module, "exact_gram", forbidden)
    problem = conflicting_pair(1.0, 1e-3, torch.float32)
    assert cosine(gem_project(problem.g, problem.J), problem.J[0]) >= -1e-6
    assert cosine(wrapper_step(problem), problem.J[0]) >= -1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_conflict_between_huge_finite_gradients_is_projected_not_refused(dtype):
    problem = conflicting_pair(1e25, 1e22, dtype)
    assert not bool(torch.isfinite(gram_module.gram(problem.J)).all())  # 1e44 > fp32 max
    for x in (gem_project(problem.g, problem.J), wrapper_step(problem)):
        assert bool(torch.isfinite(x).all())
        assert cosine(x, problem.J[0]) >= -4 * torch.finfo(dtype).eps


MULTI = {
    "mgda": (lambda opt: MGDA(opt, 2), mgda_weights),
    "lfmlf": (lambda opt: ParetoLessForgetting(opt, 2), lfmlf_weights),
}


@pytest.mark.parametrize(
    ("case", "name"),
    [(case, "mgda") for case in CASES] + [("both_near_1e-30", "lfmlf")],
    # LF-MLF declares gradients 1e25 apart Pareto-stationary (relative to the larger one)
)
def test_multi_objective_wrappers_weigh_tiny_conflicting_gradients_as_in_float64(case, name):
    problem = conflicting_pair(*CASES[case], torch.float32)
    grads = torch.stack([problem.g, problem.J[0]])
    build, weights_of = MULTI[name]
    weight = torch.nn.Parameter(torch.zeros(P))
    opt = build(torch.optim.SGD([weight], lr=1.0))
    opt.backward([(weight * row).sum() for row in grads])
    opt.step()
    expected = weights_of(grads.double()) @ grads.double()
    assert float((-weight.detach().double() - expected).norm()) <= 1e-5 * float(expected.norm())
    # the common direction decreases neither objective's loss less than to rounding
    d = -weight.detach().double()
    assert bool((grads.double() @ d >= -1e-6 * d.norm() * grads.double().norm(dim=1)).all())

"""The guarantees of the GEM projection (docs/gem.md), as properties over random problems."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery import gram
from gradsurgery.errors import NonFiniteGradientError
from gradsurgery.functional import gem_multipliers, gem_project
from tests import reference
from tests.strategies import Problem, problems
from tests.sync_guard import no_host_sync

RTOL = 1e-7  # float64 problems; the library promises 1e-6


def stacked_gram(problem: Problem) -> torch.Tensor:
    return gram.gram(torch.cat([problem.g[None], problem.J]))


def row_norms(J: torch.Tensor) -> torch.Tensor:
    return J.norm(dim=1)


def term_scale(problem: Problem, margin: float = 0.0) -> float:
    """``‖g‖ + Σ_k |v_k| ‖g_k‖``: the size of the terms summed into ``x = g + Jᵀv``.

    Rounding makes ``x`` uncertain by a small multiple of this, not of ``‖x‖`` or ``‖g‖``
    (with a margin, or nearly opposed constraints, large terms cancel).
    """
    v = gem_multipliers(stacked_gram(problem), margin).v
    return float(problem.g.norm()) + float((v.abs() * row_norms(problem.J)).sum())


def rounding_scale(problem: Problem, margin: float) -> torch.Tensor:
    """The same for ``⟨g_k, x⟩``, per constraint."""
    return row_norms(problem.J) * term_scale(problem, margin)


@given(problems(), st.sampled_from([0.0, 0.5]))
def test_no_constraint_gets_worse(problem, margin):
    x = gem_project(problem.g, problem.J, margin)
    assert torch.all(problem.J @ x >= -RTOL * rounding_scale(problem, margin))


@given(problems(), st.sampled_from([0.0, 0.25, 1.0]))
def test_dual_solution_satisfies_kkt(problem, margin):
    solution = gem_multipliers(stacked_gram(problem), margin)
    v = solution.v
    if not bool(solution.violated):
        assert torch.all(v == 0)
        return
    assert torch.all(v >= margin)
    x = problem.g + problem.J.T @ v
    dots = problem.J @ x
    scale = rounding_scale(problem, margin)
    assert torch.all(dots >= -RTOL * scale)
    # complementary slackness: a multiplier above its bound means an active constraint
    above = v - margin
    assert torch.all((above * dots).abs() <= RTOL * scale * (1 + above.abs()))


@given(problems())
def test_agrees_with_an_independent_reference(problem):
    x = gem_project(problem.g, problem.J)
    x_ref = reference.project(problem.g.numpy(), problem.J.numpy())
    assert np.linalg.norm(x.numpy() - x_ref) <= RTOL * term_scale(problem)


@given(problems(), st.floats(0.05, 2.0))
def test_agrees_with_the_reference_with_a_margin(problem, margin):
    x = gem_project(problem.g, problem.J, margin)
    x_ref = reference.project(problem.g.numpy(), problem.J.numpy(), margin)
    assert np.linalg.norm(x.numpy() - x_ref) <= RTOL * term_scale(problem, margin)


@given(problems())
def test_projecting_twice_changes_nothing(problem):
    x = gem_project(problem.g, problem.J)
    xx = gem_project(x, problem.J)
    assert torch.allclose(xx, x, rtol=0, atol=RTOL * term_scale(problem))


@given(problems(), st.floats(1e-3, 1e3))
def test_positively_homogeneous(problem, alpha):
    x = gem_project(problem.g, problem.J)
    x_scaled = gem_project(alpha * problem.g, problem.J)
    assert torch.allclose(x_scaled, alpha * x, rtol=0, atol=RTOL * alpha * term_scale(problem))


@given(problems(), st.integers(0, 2**32 - 1))
def test_invariant_to_positive_rescaling_of_each_constraint(problem, seed):
    factors = torch.tensor(
        10.0 ** np.random.default_rng(seed).uniform(-3, 3, problem.t), dtype=problem.J.dtype
    )
    x = gem_project(problem.g, problem.J)
    x_rescaled = gem_project(problem.g, factors[:, None] * problem.J)
    assert torch.allclose(x_rescaled, x, rtol=0, atol=RTOL * term_scale(problem))


@given(problems(max_p=12), st.integers(0, 2**32 - 1))
def test_no_feasible_point_tried_is_closer(problem, seed):
    x = gem_project(problem.g, problem.J)
    distance = float((x - problem.g).norm())
    rng = np.random.default_rng(seed)
    candidates = [torch.zeros_like(problem.g)]
    for _ in range(200):
        step = torch.tensor(rng.standard_normal(problem.g.shape), dtype=problem.g.dtype)
        candidates.append(x + step * float(problem.g.norm()) * 10.0 ** rng.uniform(-4, 0))
    tried = 0
    for y in candidates:
        if torch.all(problem.J @ y >= 0):
            tried += 1
            assert distance <= float((y - problem.g).norm()) * (1 + RTOL)
    assert tried >= 1


@given(problems())
def test_nothing_violated_returns_the_gradient_itself(problem):
    signs = torch.where(problem.J @ problem.g < 0, -1.0, 1.0).to(problem.J.dtype)
    J = signs[:, None] * problem.J  # every constraint now agrees with g
    assert gem_project(problem.g, J) is problem.g
    assert gem_project(problem.g, J, margin=0.5) is problem.g
    assert gem_project(problem.g, J, mode="agem") is problem.g


@given(problems(), st.sampled_from([0.0, 0.5]))
def test_agem_projects_onto_the_mean_constraint(problem, margin):
    x = gem_project(problem.g, problem.J, margin, mode="agem")
    x_ref = reference.project_agem(problem.g.numpy(), problem.J.numpy(), margin)
    scale = float(problem.g.norm()) + float(np.linalg.norm(x_ref - problem.g.numpy()))
    assert np.linalg.norm(x.numpy() - x_ref) <= RTOL * scale
    mean = problem.J.mean(dim=0)
    assert float(mean @ x) >= -RTOL * float(mean.norm()) * scale


@pytest.mark.parametrize("solver", ["enumerate", "daqp", "osqp", "clarabel"])
@given(problem=problems(max_t=5))
def test_every_solver_gives_the_same_projection(solver, problem):
    x = gem_project(problem.g, problem.J, solver=solver)
    x_ref = gem_project(problem.g, problem.J, solver="enumerate")
    tolerance = 1e-6 if solver == "clarabel" else RTOL
    assert torch.allclose(x, x_ref, rtol=0, atol=tolerance * term_scale(problem))


@given(problems())
def test_the_device_path_needs_no_host_sync_and_agrees(problem):
    expected = gem_project(problem.g, problem.J)
    with no_host_sync():
        x = gem_project(problem.g, problem.J, validate=False)
    assert x is not problem.g
    assert torch.allclose(x, expected, rtol=0, atol=RTOL * term_scale(problem))


def test_the_original_absolute_ridge_breaks_active_constraints():
    rng = np.random.default_rng(0)
    J = torch.tensor(rng.standard_normal((2, 50)) * 1e-2)
    g = -J.sum(dim=0) + torch.tensor(rng.standard_normal(50) * 1e-3)
    M = gram.gram(torch.cat([g[None], J]))
    v = gem_multipliers(M, eps=1e-3).v
    dots_after = J @ (g + J.T @ v)
    active = v > 0
    assert bool(active.any())
    # the ridge shifts each active constraint to ⟨g_k, x⟩ = −eps·v_k < 0 ...
    assert torch.allclose(dots_after[active], -1e-3 * v[active], rtol=1e-6)
    # ... which here makes a memory gradient point against the update
    x = g + J.T @ v
    cosines = dots_after / (J.norm(dim=1) * x.norm())
    assert float(cosines.min()) < -0.1
    exact = gem_project(g, J)
    assert torch.all(J @ exact >= -1e-12)


@given(problems(max_p=200, dtype=torch.float32))
def test_float32_gradients(problem):
    x = gem_project(problem.g, problem.J)
    assert x.dtype == torch.float32
    x_ref = reference.project(problem.g.double().numpy(), problem.J.double().numpy())
    as_double = Problem(problem.g.double(), problem.J.double())
    assert np.linalg.norm(x.double().numpy() - x_ref) <= 1e-4 * term_scale(as_double)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dot_products_accumulate_in_fp32(dtype, monkeypatch):
    monkeypatch.setattr(gram, "CHUNK", 1000)  # several chunks
    monkeypatch.setattr(gram, "CPU_CHUNK", 1000)
    torch.manual_seed(1)
    block = (torch.randn(3, 4500) * 0.1).to(dtype)
    exact = block.double() @ block.double().T
    assert torch.allclose(gram.gram(block), exact, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gram.cross(block, block[0]), exact[:, 0], rtol=1e-5, atol=1e-6)
    # what the same product gives when accumulated in the gradient's own dtype
    naive = (block @ block.T).double()
    assert float((naive - exact).abs().max()) > 10 * float((gram.gram(block) - exact).abs().max())


def test_low_precision_projection_is_exact_up_to_the_final_rounding():
    torch.manual_seed(2)
    J = torch.randn(3, 2000).bfloat16()
    g = (-J.float().sum(0) + 0.1 * torch.randn(2000)).bfloat16()
    x = gem_project(g, J)
    assert x.dtype == torch.bfloat16
    x_ref = torch.tensor(reference.project(g.double().numpy(), J.double().numpy()))
    assert torch.allclose(x.double(), x_ref, rtol=2**-8, atol=2**-8 * float(x_ref.abs().max()))


def test_no_constraints_returns_the_gradient():
    g = torch.randn(5)
    assert gem_project(g, torch.empty(0, 5)) is g


@pytest.mark.parametrize(
    ("grad", "constraints", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(1, 6), "1-D"),
        (torch.zeros(6), torch.zeros(6), r"shape \(t, 6\)"),
        (torch.zeros(6), torch.zeros(2, 5), r"shape \(t, 6\)"),
        (torch.zeros(6), torch.zeros(2, 6, dtype=torch.float64), "same floating dtype"),
        (torch.zeros(6, dtype=torch.int64), torch.zeros(2, 6, dtype=torch.int64), "floating"),
        (torch.zeros(6), torch.zeros(2, 6, device="meta"), "device"),
    ],
)
def test_bad_shapes_dtypes_and_devices_are_refused(grad, constraints, match):
    with pytest.raises(ValueError, match=match):
        gem_project(grad, constraints)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"margin": -0.1}, "margin"),
        ({"margin": float("nan")}, "margin"),
        ({"mode": "gem2"}, "mode"),
        ({"eps": -1.0}, "eps"),
        ({"solver": "nope"}, "not installed"),
    ],
)
def test_bad_options_are_refused(options, match):
    g, J = -torch.ones(4), torch.eye(4)[:2]
    with pytest.raises(ValueError, match=match):
        gem_project(g, J, **options)


@pytest.mark.parametrize("where", ["grad", "constraints"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_raises(where, value):
    g, J = -torch.ones(4), torch.eye(4)[:2].clone()
    (g if where == "grad" else J)[1] = value
    with pytest.raises(NonFiniteGradientError, match="NaN or Inf"):
        gem_project(g, J)

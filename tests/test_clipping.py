"""``max_grad_norm=``: every wrapper clips the rewritten gradient, after the surgery.

Regression for issue 14, item 7: ``clip_grad_norm_`` before ``opt.step()`` clips the task
gradient, which the surgery then rewrites; the option clips what is stepped.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsurgery import MGDA, GEMProjector, ParetoLessForgetting, PCGrad, Uniform
from tests.helpers import backward_all, batch_loss, mlp, params_equal
from tests.sync_guard import no_host_sync

NAMES = ["mlm", "xsr"]
LANGUAGES = ["en", "de", "fr"]


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


WRAPPERS = {
    "gem": lambda params, **kw: GEMProjector(sgd(params), constraints=NAMES, **kw),
    "gem_margin_0": lambda params, **kw: GEMProjector(sgd(params), 0.0, constraints=NAMES, **kw),
    "agem": lambda params, **kw: GEMProjector(sgd(params), constraints=NAMES, mode="agem", **kw),
    "pcgrad": lambda params, **kw: PCGrad(
        sgd(params), LANGUAGES, generator=torch.Generator().manual_seed(3), **kw
    ),
    "mgda": lambda params, **kw: MGDA(sgd(params), LANGUAGES, **kw),
    "lfmlf": lambda params, **kw: ParetoLessForgetting(sgd(params), LANGUAGES, **kw),
}


def uniform(params, **kw):
    return Uniform(sgd(params), LANGUAGES, **kw)


def fill(opt, net, step, scale=1.0):
    """This step's gradients: task and constraints for GEM, one per language otherwise."""
    if isinstance(opt, GEMProjector):
        backward_all(opt, net, step, NAMES)
        return
    losses = [
        scale * batch_loss(net, 100 * step + k, target_shift=1.5 * k - 1.0)
        for k in range(len(LANGUAGES))
    ]
    opt.backward(losses)


def flat(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("max_norm", [1e-3, 0.05, 1e9])
@pytest.mark.parametrize("name", WRAPPERS)
def test_max_grad_norm_equals_apply_surgery_then_clip_grad_norm(name, max_norm):
    net, ref = mlp(), mlp()
    opt = WRAPPERS[name](net.parameters(), max_grad_norm=max_norm)
    ref_opt = WRAPPERS[name](ref.parameters())
    for step in range(5):
        opt.zero_grad()
        fill(opt, net, step)
        opt.step()
        ref_opt.zero_grad()
        fill(ref_opt, ref, step)
        ref_opt.apply_surgery()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-5, atol=0)
        assert params_equal(net, ref), f"step {step}"


def test_clip_grad_norm_before_step_clips_the_task_gradient_not_the_result():
    """Why the option exists: the usual order steps another, unclipped gradient."""
    net, wrong = mlp(), mlp()
    opt = GEMProjector(
        torch.optim.SGD(net.parameters(), lr=0.1), constraints=NAMES, max_grad_norm=1e-3
    )
    wrong_opt = GEMProjector(torch.optim.SGD(wrong.parameters(), lr=0.1), constraints=NAMES)
    for model, optimizer in ((net, opt), (wrong, wrong_opt)):
        optimizer.zero_grad()
        backward_all(optimizer, model, 0, NAMES)
    torch.nn.utils.clip_grad_norm_(wrong.parameters(), 1e-3)  # the task gradient only
    assert bool(wrong_opt.apply_surgery().projected)
    opt.apply_surgery()
    right, wrong_grad = flat(net), flat(wrong)
    assert float(right.norm()) <= 1e-3 * (1 + 1e-6)
    # the margin's multiples of the memory gradients are not clipped, and change the direction
    assert float(wrong_grad.norm()) > 10 * 1e-3
    assert float(torch.nn.functional.cosine_similarity(right, wrong_grad, dim=0)) < 0.99


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(WRAPPERS)),
    log_scale=st.floats(-6, 3),
    log_norm=st.floats(-8, 4),
    step=st.integers(0, 50),
)
def test_the_clipped_gradient_is_the_float64_reference(name, log_scale, log_norm, step):
    """Against numpy in float64: ``x · min(1, c / (‖x‖ + 1e-6))`` of the unclipped result."""
    net, ref = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    scale, max_norm = 10.0**log_scale, 10.0**log_norm
    opt = WRAPPERS[name](net.parameters(), max_grad_norm=max_norm)
    ref_opt = WRAPPERS[name](ref.parameters())
    for model, optimizer in ((net, opt), (ref, ref_opt)):
        optimizer.zero_grad()
        fill(optimizer, model, step, scale)
        if isinstance(optimizer, GEMProjector):
            for p in model.parameters():  # the task gradient's scale; constraints keep theirs
                p.grad.mul_(scale)
        optimizer.apply_surgery()
    x = flat(ref).numpy()
    norm = float(np.sqrt(np.sum(x * x)))
    expected = x * min(1.0, max_norm / (norm + 1e-6))
    result = flat(net).numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-300)
    assert float(opt.last_grad_norm) == pytest.approx(norm, rel=1e-6)
    assert np.linalg.norm(result) <= max_norm * (1 + 1e-12) or norm <= max_norm
    if norm + 1e-6 <= max_norm:
        assert np.array_equal(result, x)  # nothing to clip: the result is untouched


def test_clipping_keeps_the_constraints_satisfied():
    net = mlp(dtype=torch.float64)
    opt = GEMProjector(
        torch.optim.SGD(net.parameters(), lr=0.1), 0.0, constraints=NAMES, max_grad_norm=1e-4
    )
    for step in range(6):
        opt.zero_grad()
        backward_all(opt, net, step, NAMES)
        rows = [torch.cat([v.flatten() for v in opt.bank.row_views(k + 1)]) for k in range(2)]
        rows = [row.clone() for row in rows]
        opt.apply_surgery()
        x = flat(net)
        assert float(x.norm()) <= 1e-4 * (1 + 1e-12)
        for row in rows:
            assert float(row @ x) >= -1e-12 * float(row.norm() * x.norm())
        opt.step()


def test_low_precision_gradients_are_clipped_as_clip_grad_norm_does():
    net, ref = mlp(dtype=torch.bfloat16), mlp(dtype=torch.bfloat16)
    opt = WRAPPERS["mgda"](net.parameters(), max_grad_norm=1e-2)
    ref_opt = WRAPPERS["mgda"](ref.parameters())
    for model, optimizer in ((net, opt), (ref, ref_opt)):
        optimizer.zero_grad()
        fill(optimizer, model, 0)
        optimizer.apply_surgery()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-2)
    torch.testing.assert_close(opt.last_grad_norm, norm.float(), rtol=1e-2, atol=0)
    torch.testing.assert_close(flat(net), flat(ref), rtol=2e-2, atol=1e-5)
    assert float(flat(net).float().norm()) <= 1e-2 * 1.01


def test_with_a_grad_scaler_the_unscaled_result_is_clipped():
    net, ref = mlp(), mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = GEMProjector(
        sgd(net.parameters()), constraints=NAMES, grad_scaler=scaler, max_grad_norm=0.01
    )
    ref_opt = GEMProjector(sgd(ref.parameters()), constraints=NAMES)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(batch_loss(net, step)).backward()
        for k, name in enumerate(NAMES):
            with opt.constraint(name):
                scaler.scale(batch_loss(net, 1000 + 10 * step + k, 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        batch_loss(ref, step).backward()
        for k, name in enumerate(NAMES):
            with ref_opt.constraint(name):
                batch_loss(ref, 1000 + 10 * step + k, 1.0).backward()
        ref_opt.apply_surgery()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
        ref_opt.step()
        assert params_equal(net, ref), f"step {step}"


def test_a_skipped_step_clips_nothing():
    net = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = GEMProjector(
        sgd(net.parameters()), constraints=NAMES, grad_scaler=scaler, max_grad_norm=0.01
    )
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    scaler.scale(batch_loss(net, 0)).backward()
    for name in NAMES:
        with opt.constraint(name):
            scaler.scale(batch_loss(net, 1)).backward()
    next(net.parameters()).grad[0, 0] = math.inf
    scaler.step(opt)
    assert opt.last_stats.skipped and opt.last_grad_norm is None
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


def test_clipping_needs_no_host_sync():
    for make in (WRAPPERS["pcgrad"], uniform):
        net = mlp()
        opt = make(net.parameters(), max_grad_norm=1e-3, validate=False)
        with no_host_sync():
            opt.zero_grad()
            fill(opt, net, 0)
            opt.apply_surgery()
        assert float(flat(net).norm()) <= 1e-3 * (1 + 1e-6)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1", TypeError),
        (True, TypeError),
    ],
)
def test_a_bad_max_grad_norm_says_what_is_allowed(value, error):
    for make in WRAPPERS.values():
        with pytest.raises(error, match="max_grad_norm must be a positive"):
            make(mlp().parameters(), max_grad_norm=value)


def test_repr_shows_max_grad_norm():
    assert "max_grad_norm=1.0" in repr(WRAPPERS["gem"](mlp().parameters(), max_grad_norm=1))
    assert "max_grad_norm" not in repr(WRAPPERS["gem"](mlp().parameters()))


def test_lfmlf_accumulates_the_direction_before_clipping():
    net, ref = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opt = WRAPPERS["lfmlf"](net.parameters(), max_grad_norm=1e-4)
    ref_opt = WRAPPERS["lfmlf"](ref.parameters())
    for model, optimizer in ((net, opt), (ref, ref_opt)):
        optimizer.zero_grad()
        fill(optimizer, model, 0)
        optimizer.apply_surgery()
    assert float(flat(net).norm()) <= 1e-4 * (1 + 1e-12) < float(flat(ref).norm())
    opt.step()
    torch.testing.assert_close(opt.accumulated(), flat(ref), rtol=1e-12, atol=0)

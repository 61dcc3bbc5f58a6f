"""The flat buffer follows what a model goes through after it was wrapped.

Each test is a reported case: the model is changed after the wrapper was built (memory
format, dtype, shape, freezing, a replaced or detached ``.grad``), and the training that
follows must equal a reference that projects by hand with ``gem_project``, or the change
must be refused with a ``RuntimeError`` before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from gradsurgery import GEMProjector, GradVac, ParetoLessForgetting
from gradsurgery.functional import gem_project

Loss = Callable[[nn.Module, int], Tensor]


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2))


def images(seed: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(seed)).to(dtype)


def task(net: nn.Module, step: int) -> Tensor:
    x = images(step, next(net.parameters()).dtype)
    return (net(x) - 1.0).square().mean()


def memory(net: nn.Module, step: int) -> Tensor:
    x = images(100 + step, next(net.parameters()).dtype)
    return (net(x) + 1.0).square().mean()


def trainable(net: nn.Module) -> list[Tensor]:
    return [p for p in net.parameters() if p.requires_grad]


def flat(grads: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def reference_step(net: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """GEM by hand: flatten g and g_1, project in float64, write back, step."""
    params = trainable(net)
    g = flat(torch.autograd.grad(task(net, step), params))
    g1 = flat(torch.autograd.grad(memory(net, step), params))
    x = gem_project(g.double(), g1.double().unsqueeze(0)).to(g.dtype)
    offset = 0
    for p in params:
        p.grad = x[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    opt.step()
    opt.zero_grad()


def wrapped_step(net: nn.Module, opt: GEMProjector, step: int) -> None:
    opt.zero_grad()
    task(net, step).backward()
    with opt.constraint():
        memory(net, step).backward()
    opt.step()


def assert_same(net: nn.Module, ref: nn.Module, tol: float = 1e-6) -> None:
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def assert_bound(opt: GEMProjector) -> None:
    """Every trainable ``.grad`` lies in the flat buffer."""
    bank = opt.bank
    for p in bank.params:
        block = next(b for b in bank.blocks if b.dtype == p.dtype)
        start = block.data_ptr()
        end = start + block.numel() * block.element_size()
        assert p.grad is not None
        assert start <= p.grad.data_ptr() < end


def pair() -> tuple[nn.Module, GEMProjector, nn.Module, torch.optim.Optimizer]:
    net, ref = conv_net(), conv_net()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9), margin=0.0)
    return net, opt, ref, torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)


def test_channels_last_after_wrapping_keeps_the_conv_gradient_in_the_buffer():
    net, opt, ref, ref_opt = pair()
    for step in range(2):
        wrapped_step(net, opt, step)
        reference_step(ref, ref_opt, step)
    net.to(memory_format=torch.channels_last)
    ref.to(memory_format=torch.channels_last)
    for step in range(2, 6):
        wrapped_step(net, opt, step)
        reference_step(ref, ref_opt, step)
        assert_same(net, ref)
    assert_bound(opt)
    weight = net[0].weight
    assert weight.grad.stride() == weight.stride()  # torch's gradient layout contract
    opt.zero_grad()
    assert all(bool((p.grad == 0).all()) for p in net.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_dtype_change_after_wrapping_rebuilds_the_buffer(dtype):
    net, opt, ref, ref_opt = pair()
    wrapped_step(net, opt, 0)
    reference_step(ref, ref_opt, 0)
    net.to(dtype)
    ref.to(dtype)
    for step in range(1, 4):
        wrapped_step(net, opt, step)
        reference_step(ref, ref_opt, step)
    assert [block.dtype for block in opt.bank.blocks] == [dtype]
    assert_bound(opt)
    assert_same(net, ref, tol=1e-6 if dtype == torch.float64 else 2e-2)


def test_a_dtype_change_between_backward_and_step_keeps_the_gradients():
    net, opt, ref, ref_opt = pair()
    opt.zero_grad()
    task(net, 0).backward()
    with opt.constraint():
        memory(net, 0).backward()
    net.double()
    opt.step()
    reference_step(ref, ref_opt, 0)
    assert_same(net, ref.double(), tol=1e-6)


def test_the_wrappers_state_survives_a_rebuild():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    lfmlf = ParetoLessForgetting(torch.optim.SGD(net.parameters(), lr=0.1), 2)
    x = torch.randn(5, 3)
    for _ in range(2):
        lfmlf.zero_grad()
        lfmlf.backward([net(x).sum(), net(x).square().sum()])
        lfmlf.step()
    accumulated = lfmlf.accumulated().clone()
    net.double()
    lfmlf.zero_grad()
    torch.testing.assert_close(lfmlf.accumulated(), accumulated.double())

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    gradvac = GradVac(torch.optim.SGD(net.parameters(), lr=0.1), 2, granularity="parameter")
    for _ in range(2):
        gradvac.zero_grad()
        gradvac.backward([net(x).sum(), -net(x).square().sum()])
        gradvac.step()
    targets = {id(p): gradvac.targets[i].clone() for i, p in enumerate(gradvac.bank.params)}
    net[1].double()  # the bank's order of parameters changes (one block per dtype)
    gradvac.zero_grad()
    for i, p in enumerate(gradvac.bank.params):
        torch.testing.assert_close(gradvac.targets[i], targets[id(p)])


def embedding_pair(
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
) -> tuple[nn.Sequential, GEMProjector, nn.Sequential, torch.optim.Optimizer]:
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 1))

    net, ref = build(), build()
    opt = GEMProjector(optimizer(net.parameters(), lr=0.1), margin=0.0)
    return net, opt, ref, optimizer(ref.parameters(), lr=0.1)


def tokens(step: int) -> Tensor:
    return torch.tensor([step % 7, (3 * step + 1) % 7, 2])


def vocabulary(net: nn.Sequential) -> int:
    return int(embedding(net).weight.shape[0])


def embedding(net: nn.Sequential) -> nn.Embedding:
    first = net[0]
    assert isinstance(first, nn.Embedding)
    return first


def grow(net: nn.Sequential) -> None:
    weight = embedding(net).weight
    weight.data = torch.cat([weight.data, torch.full((2, 3), 0.5)])


def lm_task(net: nn.Sequential, step: int) -> Tensor:
    return (net(tokens(step) % vocabulary(net)) - 1).square().sum()


def lm_memory(net: nn.Sequential, step: int) -> Tensor:
    return (net(tokens(step + 3) % vocabulary(net)) + 1).square().sum()


def test_vocabulary_growth_between_steps_rebuilds_the_buffer():
    net, opt, ref, _ = embedding_pair()
    for step in range(4):
        if step == 2:
            grow(net)
            grow(ref)
        opt.zero_grad()
        lm_task(net, step).backward()
        with opt.constraint():
            lm_memory(net, step).backward()
        opt.step()
        params = trainable(ref)
        g = flat(torch.autograd.grad(lm_task(ref, step), params))
        g1 = flat(torch.autograd.grad(lm_memory(ref, step), params))
        x = gem_project(g, g1.unsqueeze(0))
        with torch.no_grad():
            offset = 0
            for p in params:
                p.sub_(0.1 * x[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
    assert net[0].weight.shape == (7, 3)
    assert_same(net, ref)


def test_a_shape_change_after_the_backward_pass_is_refused_and_changes_nothing():
    net, opt, _, _ = embedding_pair()
    opt.zero_grad()
    lm_task(net, 0).backward()
    with opt.constraint():
        lm_memory(net, 0).backward()
    grow(net)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"changed shape .* after its gradient was computed"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    opt.zero_grad()  # the way out the message gives
    lm_task(net, 1).backward()
    with opt.constraint():
        lm_memory(net, 1).backward()
    opt.step()
    assert not torch.equal(net[0].weight, before[0])


def test_a_shape_change_the_inner_state_cannot_follow_is_refused():
    net, opt, _, _ = embedding_pair(torch.optim.Adam)
    opt.zero_grad()
    lm_task(net, 0).backward()
    with opt.constraint():
        lm_memory(net, 0).backward()
    opt.step()
    grow(net)
    with pytest.raises(RuntimeError, match="inner optimizer's state 'exp_avg'"):
        opt.zero_grad()
    del opt.state[net[0].weight]
    opt.zero_grad()
    assert net[0].weight.grad.shape == (7, 3)


def test_a_shape_change_with_lfmlf_state_is_refused():
    net = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 1))
    opt = ParetoLessForgetting(torch.optim.SGD(net.parameters(), lr=0.1), 2)
    grow(net)
    with pytest.raises(RuntimeError, match="accumulated direction"):
        opt.zero_grad()


def test_a_layer_frozen_after_wrapping_stops_moving():
    net, opt, ref, ref_opt = pair()
    for step in range(2):
        wrapped_step(net, opt, step)
        reference_step(ref, ref_opt, step)
    net[0].requires_grad_(False)
    ref[0].requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    for step in range(2, 5):
        wrapped_step(net, opt, step)
        reference_step(ref, ref_opt, step)
        assert_same(net, ref)
    assert torch.equal(net[0].weight, frozen)
    assert net[0].weight.grad is None


def test_unfreezing_once_constraint_rows_are_filled_is_refused():
    net, opt, _, _ = pair()
    net[0].requires_grad_(False)
    opt.zero_grad()
    task(net, 0).backward()
    with opt.constraint():
        memory(net, 0).backward()
    net[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="became trainable after this step's gradients"):
        opt.step()


def test_freezing_after_apply_surgery_is_refused():
    net, opt, _, _ = pair()
    opt.zero_grad()
    task(net, 0).backward()
    with opt.constraint():
        memory(net, 0).backward()
    opt.apply_surgery()
    net[0].requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"frozen .* after apply_surgery"):
        opt.step()


def test_a_grad_replaced_after_apply_surgery_is_stepped_and_does_not_leak():
    net, opt, ref, ref_opt = pair()
    for step in range(3):
        opt.zero_grad()
        task(net, step).backward()
        with opt.constraint():
            memory(net, step).backward()
        opt.apply_surgery()
        for p in net.parameters():
            p.grad = p.grad * 0.5  # the user's own clipping, out of place
        opt.step()
        params = trainable(ref)
        g = flat(torch.autograd.grad(task(ref, step), params))
        g1 = flat(torch.autograd.grad(memory(ref, step), params))
        x = gem_project(g.double(), g1.double().unsqueeze(0)).float() * 0.5
        offset = 0
        for p in params:
            p.grad = x[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        ref_opt.step()
        assert_same(net, ref)
    opt.zero_grad()
    assert all(bool((p.grad == 0).all()) for p in net.parameters())
    assert_bound(opt)


def test_a_grad_set_to_none_after_apply_surgery_is_not_stepped():
    net, opt, _, _ = pair()
    wrapped_step(net, opt, 0)  # momentum would move the weight with a zero gradient
    opt.zero_grad()
    task(net, 1).backward()
    with opt.constraint():
        memory(net, 1).backward()
    opt.apply_surgery()
    net[0].weight.grad = None
    before = net[0].weight.detach().clone()
    opt.step()
    assert torch.equal(net[0].weight, before)
    assert not torch.equal(net[3].weight, conv_net()[3].weight)


def test_detaching_a_grad_in_place_works():
    net, opt, ref, ref_opt = pair()
    for step in range(3):
        opt.zero_grad()
        task(net, step).backward()
        for p in net.parameters():
            p.grad.detach_()  # what DDP-era zero_grad code does
        with opt.constraint():
            memory(net, step).backward()
        opt.step()
        reference_step(ref, ref_opt, step)
    assert_same(net, ref)


def test_a_change_inside_a_routing_block_is_refused_until_zero_grad():
    net, opt, ref, ref_opt = pair()
    opt.zero_grad()
    task(net, 0).backward()
    with pytest.raises(RuntimeError, match="inside a gradient routing block"), opt.constraint():
        memory(net, 0).backward()
        net.double()
    with pytest.raises(RuntimeError, match="inside a gradient routing block"):
        opt.step()
    ref.double()
    for step in range(1, 3):
        wrapped_step(net, opt, step)
        reference_step(ref, ref_opt, step)
    assert_same(net, ref)


# -- parameters and gradients a flat buffer cannot hold ------------------------------------


def test_complex_parameters_are_refused_at_construction():
    param = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"complex parameters are not supported .*view_as_real"):
        GEMProjector(torch.optim.SGD([param], lr=0.1), margin=0.0)


def test_meta_parameters_are_refused_at_construction():
    net = nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match=r"meta device .*to_empty"):
        GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0)


def test_sparse_adam_is_refused_at_construction():
    net = nn.Embedding(5, 3, sparse=True)
    with pytest.raises(ValueError, match="cannot wrap SparseAdam: it needs sparse gradients"):
        GEMProjector(torch.optim.SparseAdam(net.parameters(), lr=0.1), margin=0.0)


@pytest.mark.parametrize("route", ["wrapper", "model"])
def test_sparse_embedding_gradients_are_held_densely_and_step_as_torch(route):
    def build() -> nn.Embedding:
        torch.manual_seed(0)
        return nn.Embedding(6, 3, sparse=True)

    net, ref = build(), build()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), margin=0.0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        ids = torch.tensor([step % 6, 2, 2])
        if route == "wrapper":
            opt.zero_grad()
        else:
            net.zero_grad()  # the next backward stores a sparse .grad, taken back densely
        net(ids).sum().backward()
        with opt.constraint():
            net(ids).sum().backward()  # the task itself: GEM does not project
        opt.step()
        ref_opt.zero_grad()
        ref(ids).sum().backward()
        assert ref.weight.grad.is_sparse
        ref_opt.step()
        torch.testing.assert_close(net.weight, ref.weight)
    assert net.weight.grad.layout == torch.strided


def test_a_device_change_the_inner_state_does_not_follow_is_refused():
    net, opt, _, _ = pair()
    wrapped_step(net, opt, 0)
    weight = net[0].weight
    opt.state[weight]["momentum_buffer"] = torch.zeros(weight.shape, device="meta")
    net.double()  # a recast parameter whose state is on another device than its own
    before = weight.detach().clone()
    with pytest.raises(RuntimeError, match="state 'momentum_buffer' for it is on meta"):
        opt.zero_grad()
    assert torch.equal(weight, before)


def test_add_param_group_once_constraint_rows_are_filled_is_refused_and_adds_nothing():
    net, opt, _, _ = pair()
    extra = nn.Linear(2, 2)
    opt.zero_grad()
    task(net, 0).backward()
    with opt.constraint():
        memory(net, 0).backward()
    with pytest.raises(RuntimeError, match="became trainable after this step's gradients"):
        opt.add_param_group({"params": extra.parameters()})
    assert len(opt.param_groups) == 1
    opt.step()
    opt.add_param_group({"params": extra.parameters()})  # between steps: joins the buffer
    assert len(opt.bank.params) == len(list(net.parameters())) + 2

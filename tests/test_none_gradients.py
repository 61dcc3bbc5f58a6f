"""torch's semantics for a parameter that got no gradient: the inner optimizer skips it.

Plain ``torch.optim`` steps only parameters whose ``.grad`` is not ``None``: an unused
branch or a layer frozen mid-training is not moved, momentum does not move it and AdamW's
weight decay does not shrink it. A wrapper must do the same, whichever way gradients were
set to none (the wrapper's ``zero_grad``, the inner optimizer's, the model's). The
constraint here is the task loss itself, so GEM never projects and the wrapper must equal
the plain optimizer bit for bit.
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from gradsurgery import MGDA, GEMProjector, ParetoLessForgetting
from gradsurgery.distributed import Replicated
from gradsurgery.functional import gem_project

OPTIMIZERS: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw_decay": lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.5),
}


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 4)
        self.heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])

    def forward(self, x: Tensor, branches: tuple[int, ...]) -> Tensor:
        h = torch.tanh(self.body(x))
        return sum(self.heads[b](h) for b in branches).square().mean()


def batch(step: int) -> Tensor:
    return torch.randn(6, 3, generator=torch.Generator().manual_seed(step))


def zero(net: nn.Module, opt: torch.optim.Optimizer, route: str, set_to_none: bool) -> None:
    if route == "wrapper":
        opt.zero_grad(set_to_none=set_to_none)
    elif route == "inner":
        getattr(opt, "optimizer", opt).zero_grad(set_to_none=set_to_none)
    else:
        net.zero_grad(set_to_none=set_to_none)


def train(
    make: Callable[[list[Tensor]], torch.optim.Optimizer],
    wrapped: bool,
    branches: Callable[[int], tuple[int, ...]],
    route: str | Callable[[int], str] = "wrapper",
    set_to_none: bool | Callable[[int], bool] = True,
    freeze_at: int | None = None,
    steps: int = 5,
) -> TwoBranches:
    net = TwoBranches()
    inner = make(list(net.parameters()))
    opt: torch.optim.Optimizer = GEMProjector(inner, margin=0.0) if wrapped else inner
    for step in range(steps):
        if step == freeze_at:
            net.heads[1].requires_grad_(False)
        zero(
            net,
            opt,
            route(step) if callable(route) else route,
            set_to_none(step) if callable(set_to_none) else set_to_none,
        )
        net(batch(step), branches(step)).backward()
        if isinstance(opt, GEMProjector):
            with opt.constraint():
                net(batch(step), branches(step)).backward()
        opt.step()
    return net


def assert_identical(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_an_unused_branch_is_not_stepped(optimizer):
    make = OPTIMIZERS[optimizer]
    net = train(make, True, lambda step: (0,))
    assert_identical(net, train(make, False, lambda step: (0,)))
    assert torch.equal(net.heads[1].weight, TwoBranches().heads[1].weight)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_layer_frozen_mid_training_is_not_stepped(optimizer):
    make = OPTIMIZERS[optimizer]
    net = train(make, True, lambda step: (0, 1), freeze_at=2)
    assert_identical(net, train(make, False, lambda step: (0, 1), freeze_at=2))


@pytest.mark.parametrize("route", ["wrapper", "inner", "model"])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_branch_used_then_unused_follows_torch_for_each_way_of_zeroing(
    optimizer, route, set_to_none
):
    def branches(step: int) -> tuple[int, ...]:
        return (0, 1) if step < 2 else (0,)

    make = OPTIMIZERS[optimizer]
    net = train(make, True, branches, route, set_to_none)
    assert_identical(net, train(make, False, branches, route, set_to_none))


def conflicting(net: TwoBranches) -> Tensor:
    return net(batch(1), (1,)) - 2 * net(batch(0), (0,))


@given(
    optimizer=st.sampled_from(sorted(OPTIMIZERS)),
    plan=st.lists(
        st.tuples(
            st.sampled_from([(0,), (1,), (0, 1)]),
            st.sampled_from(["wrapper", "inner", "model"]),
            st.booleans(),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_any_sequence_of_used_branches_and_zeroing_equals_torch(optimizer, plan):
    """Random per-step branch use, zeroing route and ``set_to_none``: bit for bit as torch."""
    make = OPTIMIZERS[optimizer]
    options = {
        "branches": lambda step: plan[step][0],
        "route": lambda step: plan[step][1],
        "set_to_none": lambda step: plan[step][2],
        "steps": len(plan),
    }
    assert_identical(train(make, True, **options), train(make, False, **options))


def test_a_parameter_reached_only_by_a_constraint_gets_the_projection():
    net = TwoBranches()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    loss = net(batch(0), (0,))
    loss.backward()
    with opt.constraint():
        conflicting(net).backward()  # reaches head 1, which the task does not
    opt.step()
    ref = TwoBranches()
    params = list(ref.parameters())
    task_grads = torch.autograd.grad(ref(batch(0), (0,)), params, allow_unused=True)
    g = torch.cat(
        [
            (grad if grad is not None else torch.zeros_like(p)).flatten()
            for p, grad in zip(params, task_grads, strict=True)
        ]
    )
    g1 = torch.cat([grad.flatten() for grad in torch.autograd.grad(conflicting(ref), params)])
    assert float(g @ g1) < 0  # the projection does change the step
    x = gem_project(g.double(), g1.double().unsqueeze(0)).float()
    expected = torch.cat([p.flatten() for p in before]) - 0.1 * x
    moved = torch.cat([p.detach().flatten() for p in net.parameters()])
    torch.testing.assert_close(moved, expected)
    assert not torch.equal(net.heads[1].weight, before[4])


def test_the_hooks_neither_pile_up_nor_keep_the_optimizer_alive():
    net = TwoBranches()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0)
    for step in range(3):
        net.heads[1].requires_grad_(step % 2 == 0)  # a rebuild each step
        opt.zero_grad()
        net(batch(step), (0,)).backward()
        with opt.constraint():
            net(batch(step), (0,)).backward()
        opt.step()
    hooks = [len(p._post_accumulate_grad_hooks or {}) for p in net.parameters()]
    assert max(hooks) <= 1
    copied = copy.deepcopy(net)  # the copy does not report to this optimizer
    assert all(not p._post_accumulate_grad_hooks for p in copied.parameters())
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None
    net(batch(0), (0, 1)).backward()  # hooks of a dead bank are harmless


def test_with_distributed_set_an_unreached_parameter_is_stepped_with_zero(tmp_path):
    """Another rank may have reached it: skipping it here only would split the replicas."""

    def branches(step: int) -> tuple[int, ...]:
        return (0, 1) if step < 2 else (0,)

    make = OPTIMIZERS["sgd_momentum"]
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        net = TwoBranches()
        opt = GEMProjector(make(list(net.parameters())), margin=0.0, distributed=Replicated())
        for step in range(5):
            opt.zero_grad()
            net(batch(step), branches(step)).backward()
            with opt.constraint():
                net(batch(step), branches(step)).backward()
            opt.step()
    finally:
        dist.destroy_process_group()
    assert_identical(net, train(make, False, branches, "wrapper", set_to_none=False))


@pytest.mark.parametrize("route", ["wrapper", "inner", "model"])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_layer_frozen_mid_training_follows_torch_for_each_way_of_zeroing(
    optimizer, route, set_to_none
):
    # with set_to_none=False torch keeps the frozen layer's zero .grad and steps it
    make = OPTIMIZERS[optimizer]
    net = train(make, True, lambda step: (0, 1), route, set_to_none, freeze_at=2)
    assert_identical(net, train(make, False, lambda step: (0, 1), route, set_to_none, freeze_at=2))


def test_a_multi_objective_step_leaves_gradients_that_zero_grad_keeps_as_zeros():
    net = TwoBranches()
    opt = MGDA(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), 2)
    x = batch(0)
    opt.backward([net(x, (0,)), net(x, (1,))])
    opt.step()
    head = net.heads[1].weight
    buffer = opt.state[head]["momentum_buffer"].clone()
    before = head.detach().clone()
    opt.zero_grad(set_to_none=False)  # torch: every stepped parameter keeps a zero .grad
    opt.backward([net(x, (0,)), net(x, (0,)).mul(2)])  # head 1 not reached
    opt.step()
    torch.testing.assert_close(opt.state[head]["momentum_buffer"], 0.9 * buffer)
    torch.testing.assert_close(head.detach(), before - 0.1 * 0.9 * buffer)


def test_rows_discarded_by_zero_grad_do_not_count_as_gradients():
    net = TwoBranches()
    opt = MGDA(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), 2)
    x = batch(0)
    with opt.objective(0):
        net(x, (0, 1)).backward()  # never stepped: discarded below
    opt.zero_grad(set_to_none=False)
    opt.backward([net(x, (0,)), net(x, (0,)).mul(2)])
    opt.step()
    assert net.heads[1].weight not in opt.state or not opt.state[net.heads[1].weight]


def position(params: tuple[Tensor, ...], param: Tensor) -> int:
    return next(i for i, p in enumerate(params) if p is param)


def test_lfmlf_keeps_the_accumulated_direction_of_a_frozen_layer_through_save_and_load():
    net = TwoBranches()
    opt = ParetoLessForgetting(torch.optim.SGD(net.parameters(), lr=0.1), 2)
    x = batch(0)
    opt.backward([net(x, (0,)), net(x, (1,))])
    opt.step()
    head = net.heads[1].weight
    row = opt._accumulated_row
    accumulated = opt.bank.row_views(row)[position(opt.bank.params, head)].clone()
    assert accumulated.abs().sum() > 0
    net.heads[1].requires_grad_(False)
    opt.zero_grad()
    state = opt.state_dict()
    fresh = copy.deepcopy(net)
    loaded = ParetoLessForgetting(torch.optim.SGD(fresh.parameters(), lr=0.1), 2)
    loaded.load_state_dict(state)  # was a KeyError: the frozen layer is not in the buffer
    fresh.heads[1].requires_grad_(True)
    loaded.zero_grad()
    views = loaded.bank.row_views(row)
    assert torch.equal(views[position(loaded.bank.params, fresh.heads[1].weight)], accumulated)


def test_a_layer_frozen_after_a_skipped_step_has_no_gradient_to_step():
    net = TwoBranches()
    opt = MGDA(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x = batch(0)
    opt.backward([scaler.scale(net(x, (0, 1))), scaler.scale(net(x, (1,)) * float("inf"))])
    scaler.step(opt)  # skipped: the rows never became .grad
    scaler.update()
    assert opt.last_stats is not None and opt.last_stats.skipped
    net.heads[1].requires_grad_(False)
    opt.optimizer.zero_grad(set_to_none=False)
    opt.backward([net(x, (0,)), net(x, (0,)).mul(2)])
    opt.step()
    assert not opt.state[net.heads[1].weight]  # torch: no .grad, so never stepped
    assert net.heads[1].weight.grad is None

"""The flat gradient bank: views, routing, repair, dtypes and devices."""

import pytest
import torch
from torch import nn

from gradsurgery import GradientBank


def model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def loss(net: nn.Module, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=generator)
    return net(x).square().sum()


def plain_grads(net: nn.Module, seed: int) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss(net, seed), list(net.parameters())))


def test_every_grad_is_a_view_into_row_zero_and_backward_writes_in_place():
    net = model()
    bank = GradientBank(net.parameters(), rows=2)
    assert bank.numel == sum(p.numel() for p in net.parameters())
    loss(net, 0).backward()
    block = bank.blocks[0]
    for p, expected in zip(net.parameters(), plain_grads(net, 0), strict=True):
        assert p.grad.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
        torch.testing.assert_close(p.grad, expected)
    torch.testing.assert_close(block[0], torch.cat([g.flatten() for g in plain_grads(net, 0)]))
    assert bool((block[1] == 0).all())


def test_route_sends_a_backward_to_its_row_and_leaves_row_zero_alone():
    net = model()
    bank = GradientBank(net.parameters(), rows=3)
    loss(net, 0).backward()
    with bank.route(2):
        loss(net, 1).backward()
    assert bank.bound_row == 0
    flat = [torch.cat([g.flatten() for g in plain_grads(net, seed)]) for seed in (0, 1)]
    torch.testing.assert_close(bank.blocks[0][0], flat[0])
    torch.testing.assert_close(bank.blocks[0][2], flat[1])
    assert bool((bank.blocks[0][1] == 0).all())


def test_backward_passes_accumulate_in_their_rows():
    net = model()
    bank = GradientBank(net.parameters(), rows=2)
    for seed in (0, 1):
        with bank.route(1):
            loss(net, seed).backward()
    expected = sum(torch.cat([g.flatten() for g in plain_grads(net, s)]) for s in (0, 1))
    torch.testing.assert_close(bank.blocks[0][1], expected)


def test_routing_does_not_nest():
    bank = GradientBank(model().parameters(), rows=3)
    with bank.route(1), pytest.raises(RuntimeError, match="nest"), bank.route(2):
        pass


def test_a_replaced_grad_is_copied_back_and_rebound():
    net = model()
    bank = GradientBank(net.parameters(), rows=2)
    net.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in net.parameters())
    loss(net, 0).backward()  # autograd allocates fresh .grad tensors
    assert bank.repair() == len(list(net.parameters()))
    expected = torch.cat([g.flatten() for g in plain_grads(net, 0)])
    torch.testing.assert_close(bank.blocks[0][0], expected)
    assert bank.repair() == 0


def test_a_parameter_without_gradient_counts_as_zero():
    net = model()
    bank = GradientBank(net.parameters(), rows=1)
    bank.blocks[0].fill_(1.0)
    first = next(net.parameters())
    first.grad = None
    bank.repair()
    assert bool((first.grad == 0).all())
    assert first.grad.untyped_storage().data_ptr() == bank.blocks[0].untyped_storage().data_ptr()


def test_frozen_parameters_are_left_out():
    net = model()
    net[0].weight.requires_grad_(False)
    bank = GradientBank(net.parameters(), rows=1)
    assert bank.numel == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert net[0].weight.grad is None
    loss(net, 0).backward()
    assert net[0].weight.grad is None


def test_existing_gradients_are_kept():
    net = model()
    loss(net, 0).backward()
    before = [p.grad.clone() for p in net.parameters()]
    GradientBank(net.parameters(), rows=2)
    for p, grad in zip(net.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, grad)


def test_one_block_per_dtype_and_a_gram_over_all_of_them():
    net = model()
    net[2].to(torch.float64)
    bank = GradientBank(net.parameters(), rows=2)
    assert sorted(str(b.dtype) for b in bank.blocks) == ["torch.float32", "torch.float64"]
    for block in bank.blocks:
        block.copy_(torch.randn_like(block))
    rows = torch.cat([block.double() for block in bank.blocks], dim=1)
    torch.testing.assert_close(bank.gram(), rows @ rows.T)


def test_combine_writes_row_zero_from_the_other_rows():
    bank = GradientBank(model().parameters(), rows=3)
    rows = torch.randn_like(bank.blocks[0])
    bank.blocks[0].copy_(rows)
    weights = torch.tensor([0.5, -2.0], dtype=torch.float64)
    bank.combine_(weights, accumulate=True)
    torch.testing.assert_close(bank.blocks[0][0], rows[0] + 0.5 * rows[1] - 2.0 * rows[2])
    bank.combine_(weights, accumulate=False)
    torch.testing.assert_close(bank.blocks[0][0], 0.5 * rows[1] - 2.0 * rows[2])


def test_rebuilt_bank_keeps_rows_of_parameters_it_still_holds():
    net = model()
    bank = GradientBank(net.parameters(), rows=2)
    bank.blocks[0].copy_(torch.randn_like(bank.blocks[0]))
    kept = {id(p): p.grad.clone() for p in net.parameters()}
    net[0].bias.requires_grad_(False)
    assert not bank.owns(net.parameters())
    new = bank.rebuilt(net.parameters())
    assert new.owns(net.parameters())
    for p in new.params:
        torch.testing.assert_close(p.grad, kept[id(p)])


def test_parameters_on_two_devices_are_refused():
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))]
    with pytest.raises(ValueError, match="several devices"):
        GradientBank(params, rows=1)


def test_nothing_trainable_is_refused():
    net = model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        GradientBank(net.parameters(), rows=1)


def test_at_least_one_row():
    with pytest.raises(ValueError, match="rows"):
        GradientBank(model().parameters(), rows=0)


def test_sparse_parameters_are_refused():
    sparse = nn.Parameter(torch.zeros(3, 3).to_sparse())
    with pytest.raises(ValueError, match="layout"):
        GradientBank([sparse], rows=1)


def test_grads_alias_the_rows_without_being_views_and_keep_the_parameters_layout():
    conv = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    bank = GradientBank(conv.parameters(), rows=2)
    assert not conv.weight.grad._is_view()
    assert conv.weight.grad.stride() == conv.weight.stride()
    conv.weight.grad.detach_()  # allowed on an alias, refused on a view
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    torch.testing.assert_close(
        bank.blocks[0][0].sum(), sum(p.grad.sum() for p in conv.parameters())
    )


def test_changes_tell_joined_left_recast_and_reshaped_parameters_apart():
    net = model()
    bank = GradientBank(net.parameters(), rows=1)
    assert not bank.changes(net.parameters())
    net[0].bias.requires_grad_(False)
    net[2].double()
    net[0].weight.data = torch.zeros(5, 3)
    extra = nn.Parameter(torch.zeros(2))
    changes = bank.changes([*net.parameters(), extra])
    assert changes.left == (net[0].bias,)
    assert set(map(id, changes.recast)) == {id(net[2].weight), id(net[2].bias)}
    assert changes.reshaped == (net[0].weight,)
    assert changes.joined == (extra,)


def test_a_rebuilt_bank_converts_rows_and_records_who_got_a_gradient():
    net = model()
    bank = GradientBank(net.parameters(), rows=2)
    with bank.route(1):
        loss(net, 0).backward()
    rows = [v.clone() for v in bank.row_views(1)]
    assert bank.without_gradient() == []
    net.double()
    new = bank.rebuilt(net.parameters())
    assert new.blocks[0].dtype == torch.float64
    for view, row in zip(new.row_views(1), rows, strict=True):
        torch.testing.assert_close(view, row.double())
    assert new.without_gradient() == []
    new.forget(slice(None))
    assert new.without_gradient() == list(range(len(new.params)))

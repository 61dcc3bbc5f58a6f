"""The stray-backward check of the multi-objective wrappers reads no gradient when it can.

Row 0 (``.grad``) must hold no gradient when a multi-objective step starts. The bank knows
it is still zero since ``zero_grad()`` from the version counters of the ``.grad`` tensors
(every in-place write, a backward pass's included, increments them); only when it cannot
tell is row 0 read. The Gram matrix never includes row 0 (outside a sharded step), so both
ways give bit-identical steps; ``Uniform`` computes no Gram matrix unless ``stats=True``.
"""

import pytest
import torch
from torch import nn

from gradsurgery import MGDA, GradVac, ParetoLessForgetting, PCGrad, Uniform
from gradsurgery import gram as gram_module
from tests.helpers import batch_loss, mlp

LANGUAGES = ["en", "de", "fr"]
WRAPPERS = [
    lambda net: Uniform(torch.optim.SGD(net.parameters(), lr=0.05), LANGUAGES),
    lambda net: Uniform(torch.optim.SGD(net.parameters(), lr=0.05), LANGUAGES, stats=True),
    lambda net: PCGrad(
        torch.optim.SGD(net.parameters(), lr=0.05),
        LANGUAGES,
        generator=torch.Generator().manual_seed(7),
    ),
    lambda net: GradVac(
        torch.optim.SGD(net.parameters(), lr=0.05),
        LANGUAGES,
        generator=torch.Generator().manual_seed(7),
    ),
    lambda net: MGDA(torch.optim.SGD(net.parameters(), lr=0.05), LANGUAGES),
    lambda net: ParetoLessForgetting(torch.optim.SGD(net.parameters(), lr=0.05), LANGUAGES),
]


def fill(opt, net: nn.Module, step: int) -> None:
    opt.zero_grad()
    opt.backward(
        {name: batch_loss(net, 10 * step + k, 1.5 * k - 1.0) for k, name in enumerate(LANGUAGES)}
    )


def test_row0_is_known_zero_after_zero_grad_and_routed_backwards_only():
    net = mlp()
    opt = Uniform(torch.optim.SGD(net.parameters(), lr=0.1), LANGUAGES)
    assert not opt.bank.row0_zero()  # never zeroed: unknown
    fill(opt, net, 0)
    assert opt.bank.row0_zero()
    opt.step()
    assert not opt.bank.row0_zero()  # the step wrote d into row 0


@pytest.mark.parametrize(
    "write",
    [
        lambda net: batch_loss(net, 5).backward(),
        lambda net: next(net.parameters()).grad.add_(1.0),
        lambda net: next(net.parameters()).grad.mul_(1.0),  # no value changes, still a write
        lambda net: (net.zero_grad(), batch_loss(net, 5).backward()),  # .grad replaced
    ],
)
def test_any_write_into_grad_makes_row0_unknown(write):
    net = mlp()
    opt = Uniform(torch.optim.SGD(net.parameters(), lr=0.1), LANGUAGES)
    fill(opt, net, 0)
    write(net)
    opt.bank.repair()
    assert not opt.bank.row0_zero()


@pytest.mark.parametrize("make", WRAPPERS)
def test_a_gradient_written_in_place_outside_every_objective_is_an_error(make):
    net = mlp()
    opt = make(net)
    before = [p.detach().clone() for p in net.parameters()]
    fill(opt, net, 0)
    with torch.no_grad():
        next(net.parameters()).grad[0, 0] = 1e-30  # no backward pass, no hook
    with pytest.raises(RuntimeError, match="outside every"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


@pytest.mark.parametrize("make", WRAPPERS)
def test_the_step_is_bit_identical_whether_row0_is_known_zero_or_read(make):
    nets = [mlp(), mlp()]
    opts = [make(net) for net in nets]
    for step in range(3):
        for touched, (opt, net) in enumerate(zip(opts, nets, strict=True)):
            fill(opt, net, step)
            if touched:
                for p in net.parameters():
                    p.grad.mul_(1.0)  # row 0 stays zero but must be read
            opt.step()
    for p, q in zip(*(net.parameters() for net in nets), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make", WRAPPERS)
def test_a_clean_step_reads_row0_nowhere(make, monkeypatch):
    net = mlp()
    opt = make(net)
    fill(opt, net, 0)
    grams, reads = [], []
    original_gram, original_aminmax = gram_module.gram, torch.aminmax
    row0 = opt.bank.blocks[0][0]

    def spy_gram(block):
        grams.append(block.data_ptr() == opt.bank.blocks[0][1].data_ptr())
        return original_gram(block)

    def spy_aminmax(x, *args, **kwargs):
        reads.append(x.data_ptr() == row0.data_ptr() and x.numel() == row0.numel())
        return original_aminmax(x, *args, **kwargs)

    monkeypatch.setattr(gram_module, "gram", spy_gram)
    monkeypatch.setattr(torch, "aminmax", spy_aminmax)
    opt.apply_surgery()
    if isinstance(opt, Uniform) and not opt.stats:
        assert not grams  # the mean needs no Gram matrix
    else:
        assert grams and all(grams)  # every Gram starts at row 1
    assert not any(reads)


@pytest.mark.parametrize("make", WRAPPERS)
def test_an_unknown_row0_is_read_once(make, monkeypatch):
    net = mlp()
    opt = make(net)
    fill(opt, net, 0)
    for p in net.parameters():
        p.grad.mul_(1.0)  # row 0 stays zero, but the bank cannot know it
    reads = []
    original_aminmax = torch.aminmax
    row0 = opt.bank.blocks[0][0]

    def spy_aminmax(x, *args, **kwargs):
        reads.append(x.data_ptr() == row0.data_ptr() and x.numel() == row0.numel())
        return original_aminmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", spy_aminmax)
    opt.apply_surgery()
    assert reads.count(True) == 1

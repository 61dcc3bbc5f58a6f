"""A tiny regression problem with a task loss and memory losses, and a reference step."""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gradsurgery.functional import gem_project


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch_loss(net: nn.Module, seed: int, target_shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    x = torch.randn(16, 6, generator=generator).to(dtype)
    y = (torch.randn(16, 3, generator=generator) + target_shift).to(dtype)
    return (net(x) - y).square().mean()


def task_loss(net: nn.Module, step: int) -> torch.Tensor:
    return batch_loss(net, 1000 + step, target_shift=2.0)


def memory_loss(net: nn.Module, step: int, k: int) -> torch.Tensor:
    return batch_loss(net, 10 * step + k, target_shift=-1.0 + k)


def flat_grad(net: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.flatten() for g in grads])


def set_flat_grad(net: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in net.parameters():
        if p.requires_grad:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()


def reference_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    constraints: int,
    project: Callable[..., torch.Tensor] = gem_project,
    **options: object,
) -> None:
    """One step as a user would write it by hand: flatten, project, write back, step."""
    g = flat_grad(net, task_loss(net, step))
    J = torch.stack([flat_grad(net, memory_loss(net, step, k)) for k in range(constraints)])
    set_flat_grad(net, project(g, J, **options))
    optimizer.step()


def backward_all(opt, net: nn.Module, step: int, names: Sequence[str]) -> torch.Tensor:
    """The task backward into ``.grad`` and each memory backward into its constraint row."""
    loss = task_loss(net, step)
    loss.backward()
    for k, name in enumerate(names):
        with opt.constraint(name):
            memory_loss(net, step, k).backward()
    return loss


def wrapped_step(opt, net: nn.Module, step: int, names: Sequence[str]) -> None:
    opt.zero_grad()
    backward_all(opt, net, step, names)
    opt.step()


def params_equal(a: nn.Module, b: nn.Module, exact: bool = False) -> bool:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    if exact:
        return all(torch.equal(p, q) for p, q in pairs)
    return all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in pairs)

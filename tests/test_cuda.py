"""CUDA: the same results as on the CPU, and no host synchronisation in the surgery.

Skipped without a CUDA device (see conftest.py); run them on a GPU machine with
``python -m pytest -m cuda``.
"""

import pytest
import torch

from gradsurgery import GEMProjector, NonFiniteGradientError, Uniform, gram
from gradsurgery.functional import gem_project
from tests.helpers import memory_loss, mlp, task_loss

pytestmark = pytest.mark.cuda
NAMES = ["mlm", "xsr"]


@pytest.mark.parametrize("t", [1, 3, 8, 12])
def test_projection_matches_the_cpu(t):
    generator = torch.Generator().manual_seed(t)
    J = torch.randn(t, 4096, generator=generator, dtype=torch.float64)
    g = -J.sum(dim=0) + torch.randn(4096, generator=generator, dtype=torch.float64)
    x_cpu = gem_project(g, J)
    x_gpu = gem_project(g.cuda(), J.cuda())
    assert x_gpu.device.type == "cuda"
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t", [1, 2, 8])
@pytest.mark.parametrize("mode", ["gem", "agem"])
def test_functional_projection_does_not_synchronise(t, mode):
    J = torch.randn(t, 100_000, device="cuda")
    g = -J.sum(dim=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = gem_project(g, J, mode=mode, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    constraints = J if mode == "gem" else J.mean(dim=0, keepdim=True)
    dots = constraints @ x
    assert bool((dots >= -1e-4 * constraints.norm(dim=1) * g.norm()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrapper_step_does_not_synchronise_and_matches_the_cpu(dtype):
    nets = {device: mlp(dtype=dtype).to(device) for device in ("cpu", "cuda")}
    opts = {
        device: GEMProjector(
            torch.optim.SGD(net.parameters(), lr=0.1), margin=0.0, constraints=NAMES, validate=False
        )
        for device, net in nets.items()
    }
    for step in range(3):
        for device, net in nets.items():
            opt = opts[device]
            opt.zero_grad()
            task_loss(net, step).backward()
            for k, name in enumerate(NAMES):
                with opt.constraint(name):
                    memory_loss(net, step, k).backward()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.apply_surgery()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            opt.step()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for p, q in zip(nets["cpu"].parameters(), nets["cuda"].parameters(), strict=True):
        torch.testing.assert_close(q.cpu(), p, rtol=tolerance, atol=tolerance)


def test_tf32_does_not_leak_into_the_gram():
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        J = torch.randn(2, 1 << 20, device="cuda")
        g = -J[0] + 1e-3 * torch.randn(1 << 20, device="cuda")
        x = gem_project(g, J)
        x_ref = gem_project(g.double(), J.double())
        torch.testing.assert_close(x.double(), x_ref, rtol=1e-4, atol=1e-5)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_without_a_gram_matrix_on_the_device(dtype):
    """The checked write in column chunks: no sync with validate=False, the Gram path's
    ``.grad`` bit for bit, the CPU's within rounding, a NaN row refused with ``.grad`` zero."""
    p = gram.CHUNK + 12_345  # two chunks on the device
    rows = torch.randn(3, p, generator=torch.Generator().manual_seed(0)).to(dtype)
    grads = {}
    for device, stats, validate in [
        ("cuda", False, False),
        ("cuda", True, True),
        ("cpu", False, True),
    ]:
        w = torch.zeros(p, dtype=dtype, device=device, requires_grad=True)
        opt = Uniform(torch.optim.SGD([w], lr=0.1), 3, stats=stats, validate=validate)
        opt.zero_grad()
        for k in range(3):
            with opt.objective(k):
                (w * rows[k].to(device)).sum().backward()
        if device == "cuda" and not validate:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.apply_surgery()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert w.grad is not None
        grads[device, stats] = w.grad.cpu()
    assert torch.equal(grads["cuda", False], grads["cuda", True])
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(
        grads["cuda", False], grads["cpu", False], rtol=tolerance, atol=tolerance
    )

    w = torch.zeros(p, dtype=dtype, device="cuda", requires_grad=True)
    opt = Uniform(torch.optim.SGD([w], lr=0.1), 3)
    opt.zero_grad()
    for k in range(3):
        with opt.objective(k):
            spoiled = rows[k].cuda().clone()
            if k == 2:
                spoiled[-1] = float("nan")  # in the second chunk
            (w * spoiled).sum().backward()
    with pytest.raises(NonFiniteGradientError, match="NaN or Inf"):
        opt.step()
    assert w.grad is not None and not bool(w.grad.any()) and not bool(w.any())

"""``zero_grad`` clears the gradient rows, never a wrapper's internal rows (its state)."""

import torch

from gradsurgery import ParetoLessForgetting


def test_lfmlf_accumulated_direction_survives_zero_grad():
    theta_p = torch.tensor([1.0, -2.0], dtype=torch.float64)
    theta = torch.nn.Parameter(theta_p.clone())
    lr = 0.1
    opt = ParetoLessForgetting(torch.optim.SGD([theta], lr=lr), objectives=["a", "b"])
    directions = []
    for _ in range(3):
        opt.zero_grad()
        opt.backward({"a": (theta - 1).square().sum(), "b": (theta + 1).square().sum()})
        opt.step()
        directions.append(theta.grad.clone())
    # ḡ is the sum of every step's d; with plain SGD that is the displacement over lr.
    torch.testing.assert_close(opt.accumulated(), sum(directions))
    torch.testing.assert_close(opt.accumulated(), (theta_p - theta.detach()) / lr)
    opt.zero_grad()
    torch.testing.assert_close(opt.accumulated(), sum(directions))
    assert not theta.grad.any()

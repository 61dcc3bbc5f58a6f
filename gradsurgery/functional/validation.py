"""Checks shared by the functional forms of the multi-objective methods."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurgery.errors import NonFiniteGradientError

__all__ = ["check_gradients", "check_no_autograd", "check_reduction"]


def check_no_autograd(function: str, **inputs: Tensor | None) -> None:
    """Refuse inputs that require grad while grad mode is on.

    The functional forms solve small QPs and branch on signs: their outputs are not
    differentiable functions of their inputs in general (nor through every backend), so
    rather than return a wrong or missing derivative they refuse.

    Raises:
        ValueError: naming the first such input and saying to pass it detached.
    """
    if not torch.is_grad_enabled():
        return
    for name, tensor in inputs.items():
        if tensor is not None and tensor.requires_grad:
            raise ValueError(
                f"{function}: {name} requires grad, but {function} is not differentiable; "
                f"pass {name}.detach() (or call it under torch.no_grad())"
            )


def check_gradients(grads: Tensor, function: str) -> None:
    """Raise unless ``grads`` is a finite floating ``(T, p)`` matrix with ``T ≥ 1``.

    ``grads`` must not require grad either (see :func:`check_no_autograd`).
    """
    check_no_autograd(function, grads=grads)
    if grads.dim() != 2 or grads.shape[0] == 0:
        raise ValueError(
            f"grads must be a (T, p) matrix with one row per objective and T ≥ 1, got shape "
            f"{tuple(grads.shape)}"
        )
    if not grads.is_floating_point():
        raise ValueError(f"grads must be floating point, got {grads.dtype}")
    finite = torch.isfinite(grads).all(dim=1)
    if not bool(finite.all()):
        rows = [int(i) for i in torch.nonzero(~finite).flatten()]
        raise NonFiniteGradientError(f"gradient rows {rows} hold NaN or Inf values")


def check_reduction(reduction: str) -> None:
    """Raise unless ``reduction`` is ``"sum"`` or ``"mean"``."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")

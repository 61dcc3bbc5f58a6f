"""Checks shared by the functional forms of the multi-objective methods."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gradsurgery import gram
from gradsurgery.errors import NonFiniteGradientError

__all__ = ["check_gradients", "check_no_autograd", "check_reduction", "finite_gram"]


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


def check_gradients(grads: Tensor, function: str, *, finite: bool = True) -> None:
    """Raise unless ``grads`` is a floating ``(T, p)`` matrix with ``T ≥ 1`` (and finite).

    ``grads`` must not require grad either (see :func:`check_no_autograd`). With
    ``finite=False`` the values are not read: callers that compute the Gram matrix check
    finiteness there instead (:func:`finite_gram`), without another pass over ``p``.
    """
    check_no_autograd(function, grads=grads)
    if grads.dim() != 2 or grads.shape[0] == 0:
        raise ValueError(
            f"grads must be a (T, p) matrix with one row per objective and T ≥ 1, got shape "
            f"{tuple(grads.shape)}"
        )
    if not grads.is_floating_point():
        raise ValueError(f"grads must be floating point, got {grads.dtype}")
    if finite:
        _raise_for_non_finite_rows(grads)


def _raise_for_non_finite_rows(grads: Tensor) -> None:
    finite = torch.isfinite(grads).all(dim=1)
    if not bool(finite.all()):
        rows = [int(i) for i in torch.nonzero(~finite).flatten()]
        raise NonFiniteGradientError(f"gradient rows {rows} hold NaN or Inf values")


def finite_gram(
    grads: Tensor, function: str, *, too_coarse: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """The float64 Gram matrix ``grads @ grads.T`` of checked gradients, finiteness included.

    A NaN or Inf entry of row ``t`` makes ``K_tt = Σ_j g_tj²`` NaN or Inf, so a finite Gram
    proves finite input: the usual step reads the gradients once (one host read of a
    flag). Only a non-finite Gram costs more: the rows are checked
    (:class:`~gradsurgery.errors.NonFiniteGradientError` naming them), and finite rows
    whose squares overflow the accumulation dtype (fp32 gradients above about 1e19) get
    the exact Gram of :func:`gradsurgery.gram.exact_gram` instead. So do gradients
    whose Gram ``K`` (accumulated in fp32 for fp32/fp16/bf16 rows) is ``too_coarse(K)``
    (a 0-d bool, read with the finiteness flag: still one host read).

    Raises:
        ValueError: see :func:`check_gradients`.
        NonFiniteGradientError: a row holds NaN or Inf, or its squared norm overflows
            float64.
    """
    check_gradients(grads, function, finite=False)
    K = gram.gram(grads)
    finite = K.isfinite().all()
    if too_coarse is None or gram.is_exact([grads.dtype]):
        if bool(finite):
            return K
    else:
        is_finite, coarse = torch.stack([finite, too_coarse(K)]).tolist()
        if is_finite and not coarse:
            return K
        if is_finite:
            return gram.exact_gram(grads)
    _raise_for_non_finite_rows(grads)
    K = gram.exact_gram(grads)
    if not bool(K.isfinite().all()):
        raise NonFiniteGradientError(
            f"{function}: the gradients' squared norms overflow float64 (entries above "
            "about 1e154); scale the losses down"
        )
    return K


def check_reduction(reduction: str) -> None:
    """Raise unless ``reduction`` is ``"sum"`` or ``"mean"``."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")

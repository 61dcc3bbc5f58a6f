r"""GEM: projection of a gradient onto the cone where no memory loss increases.

Gradient Episodic Memory (Lopez-Paz & Ranzato, 2017), used for cross-lingual fine-tuning by
Liu et al. (2021), replaces the task gradient :math:`g` by the closest vector that has a
non-negative inner product with every memory ("constraint") gradient
:math:`g_1, \dots, g_t` (the rows of :math:`J`):

.. math::

    \min_x \tfrac12 \lVert x - g \rVert^2 \quad \text{s.t.} \quad J x \ge 0 .

It is solved through its dual in :math:`t` variables, with :math:`K = J J^\top`:

.. math::

    \min_v \tfrac12 v^\top K v + (J g)^\top v \quad \text{s.t.} \quad v \ge m,
    \qquad x = g + J^\top v^* ,

where :math:`m \ge 0` is GEM's "memory strength" (``margin``; 0.5 in the original code).
With :math:`m = 0`, :math:`x` is the exact Euclidean projection. If :math:`J g \ge 0`
already, :math:`x = g`. A-GEM (Chaudhry et al., 2019) projects onto the single constraint
given by the mean memory gradient :math:`\bar g = \tfrac1t \sum_k g_k` instead:
:math:`x = g + v \bar g` with :math:`v = \max(m, -g^\top \bar g / \lVert \bar g \rVert^2)`
when :math:`g^\top \bar g < 0`.

Everything is computed from the Gram of :math:`[g; J]`; the full-size tensors are read
once for the Gram and once for :math:`x`.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gradsurgery import gram as _gram
from gradsurgery import qp, sync
from gradsurgery.errors import NonFiniteGradientError, SolverError

__all__ = ["GEMMode", "GEMSolution", "gem_multipliers", "gem_project"]

GEMMode = Literal["gem", "agem"]
_MODES = ("gem", "agem")


class GEMSolution(NamedTuple):
    """Dual solution of one GEM step, as tensors on the Gram's device.

    Attributes:
        v: multipliers ``(t,)``; the projected gradient is ``x = g + Jᵀv`` (all zero when
            nothing is violated).
        violated: 0-d bool, whether any constraint was violated (``(Jg)_k < 0``; for
            A-GEM, ``g·ḡ < 0``), i.e. whether ``x ≠ g``.
        kkt_residual: 0-d, relative KKT residual of the dual solution (0 when not violated).
    """

    v: Tensor
    violated: Tensor
    kkt_residual: Tensor


def check_options(margin: float, mode: str, eps: float) -> None:
    """Raise ``ValueError`` for a margin, mode or ridge outside what GEM allows."""
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number ≥ 0, got {margin}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number ≥ 0, got {eps}")


def gem_multipliers(
    gram: Tensor,
    margin: float = 0.0,
    *,
    mode: GEMMode = "gem",
    solver: str = "auto",
    eps: float = 0.0,
) -> GEMSolution:
    """Solve the GEM dual from the Gram of the stacked gradients ``[g; g_1; …; g_t]``.

    Args:
        gram: ``(t + 1, t + 1)`` float64 Gram matrix, the task gradient first (``t = 0``
            is allowed: nothing is violated).
        margin: lower bound ``m ≥ 0`` on the multipliers (GEM's memory strength).
        mode: ``"gem"`` (one constraint per row) or ``"agem"`` (the mean row).
        solver: see :func:`gradsurgery.qp.solve_lower_bounded`; ignored for A-GEM, whose
            single constraint has a closed form.
        eps: absolute ridge added to the diagonal of ``K``, as the original GEM code does
            with ``eps = 1e-3``. It makes the result inexact: at the solution
            ``⟨g_k, x⟩ = −eps·v_k`` for an active constraint, so a memory loss can still
            increase. Leave it at 0 for the exact projection.

    Returns:
        The multipliers, whether a constraint was violated, and the KKT residual. When the
        solver runs on the device (``"closed_form"``, ``"enumerate"``), nothing is copied
        to the host.
    """
    check_options(margin, mode, eps)
    b = gram[1:, 0]
    K = gram[1:, 1:]
    t = b.shape[0]
    if t == 0:  # nothing to keep: x = g
        return GEMSolution(b, b.new_zeros((), dtype=torch.bool), b.new_zeros(()))
    if eps:
        K = K + eps * torch.eye(t, dtype=K.dtype, device=K.device)
    if mode == "agem":
        b_ref = (b.sum() / t).reshape(1)
        K_ref = (K.sum() / t**2).reshape(1, 1)
        violated = b_ref[0] < 0
        solution = qp.solve_lower_bounded(K_ref, b_ref, b_ref.new_full((1,), margin), "closed_form")
        v = solution.v.expand(t) / t
    else:
        violated = (b < 0).any()
        lower = b.new_full((t,), margin)
        resolved = qp.resolve_solver(solver, t)
        if qp.is_host_solver(resolved) and not (bool(violated) and bool(gram.isfinite().all())):
            # The host solver needs the data on the host anyway; skip it when there is
            # nothing to solve (or nothing sane to solve: the caller reports non-finite input).
            return GEMSolution(torch.zeros_like(b), violated, b.new_zeros(()))
        solution = qp.solve_lower_bounded(K, b, lower, resolved)
        v = solution.v
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    return GEMSolution(
        torch.where(violated, v, zero),
        violated,
        torch.where(violated, solution.kkt_residual, zero),
    )


def raise_if_failed(finite: bool, kkt_residual: float, solver: str, tolerance: float) -> None:
    """Raise the error a step must not go past: non-finite input or an inexact solve."""
    if not finite:
        raise NonFiniteGradientError(
            "a gradient holds NaN or Inf values (or its squared norm overflows); nothing "
            "was changed. Check the losses of this step, or pass a GradScaler to skip such "
            "steps"
        )
    if not kkt_residual <= tolerance:
        raise SolverError(
            f"the GEM dual was not solved to tolerance (KKT residual {kkt_residual:.2e} > "
            f"{tolerance:.1e}, solver {solver!r}); nothing was changed. Try "
            "solver='daqp' or 'enumerate'"
        )


def gem_project(
    grad: Tensor,
    constraints: Tensor,
    margin: float = 0.0,
    *,
    mode: GEMMode = "gem",
    solver: str = "auto",
    eps: float = 0.0,
    validate: bool = True,
) -> Tensor:
    """Project ``grad`` so that no constraint gradient has a negative inner product with it.

    Args:
        grad: the task gradient, shape ``(p,)``.
        constraints: the memory gradients as rows, shape ``(t, p)``, same device and dtype.
        margin: GEM's memory strength ``m ≥ 0`` (multipliers ``v ≥ m`` when projecting).
        mode: ``"gem"`` or ``"agem"`` (project onto the mean constraint).
        solver: dual QP solver, see :func:`gradsurgery.qp.solve_lower_bounded`.
        eps: absolute ridge of the original GEM code (inexact; see
            :func:`gem_multipliers`).
        validate: raise :class:`~gradsurgery.errors.NonFiniteGradientError` for NaN/Inf
            input and :class:`~gradsurgery.errors.SolverError` for an inexact solve. On an
            accelerator this reads three numbers back to the host; with ``False`` the call
            is free of host synchronisation (given a device solver) and always returns a
            new tensor.

    Returns:
        ``x = grad + constraintsᵀ v``, same shape, dtype and device as ``grad``. When no
        constraint is violated and that is known on the host (CPU tensors, or
        ``validate=True``), ``grad`` itself is returned: no copy.

    Raises:
        ValueError: shapes, devices or dtypes that do not match, or bad options.
    """
    check_options(margin, mode, eps)
    if grad.dim() != 1:
        raise ValueError(f"grad must be 1-D (p,), got shape {tuple(grad.shape)}")
    if constraints.dim() != 2 or constraints.shape[1] != grad.shape[0]:
        raise ValueError(
            f"constraints must have shape (t, {grad.shape[0]}) to match grad, got "
            f"{tuple(constraints.shape)}; for one constraint use constraints.unsqueeze(0)"
        )
    if constraints.device != grad.device:
        raise ValueError(
            f"constraints are on {constraints.device} but grad is on {grad.device}; move "
            "them to one device"
        )
    if constraints.dtype != grad.dtype or not grad.is_floating_point():
        raise ValueError(
            f"grad and constraints need the same floating dtype, got {grad.dtype} and "
            f"{constraints.dtype}"
        )
    if constraints.shape[0] == 0:
        return grad
    b = _gram.cross(constraints, grad)
    K = _gram.gram(constraints)
    gram = torch.zeros(b.shape[0] + 1, b.shape[0] + 1, dtype=b.dtype, device=b.device)
    gram[1:, 0] = b
    gram[0, 1:] = b
    gram[1:, 1:] = K
    solution = gem_multipliers(gram, margin, mode=mode, solver=solver, eps=eps)
    if validate:
        finite, violated, kkt = torch.stack(
            [torch.isfinite(gram).all(), solution.violated, solution.kkt_residual]
        ).tolist()
        tolerance = qp.kkt_tolerance(constraints.shape[0], [grad.dtype])
        raise_if_failed(bool(finite), kkt, solver, tolerance)
        if not violated:
            return grad
    elif sync.host_reads_are_free(grad.device) and not bool(solution.violated):
        return grad
    return _gram.combine_(grad.clone(), constraints, solution.v, accumulate=True)

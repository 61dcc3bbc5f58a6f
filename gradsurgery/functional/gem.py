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
once for the Gram and once for :math:`x` (:func:`gem_project` reads :math:`g` once more,
for its norm: the certificate's unit).

Whenever the result is read back to the host anyway (``validate=True``, or a GradScaler in
the wrapper), :func:`check_solution` also makes sure of it: a Gram whose diagonal says that
fp32 accumulation may have underflowed (gradients below about 1e-19), or that is not finite
(gradients above about 1e19 overflow it), is recomputed in float64 from rescaled rows,
and a solution that fails the certificate of :func:`gradsurgery.qp.kkt_residual` is
replaced by the exact host solver's (``FALLBACK_SOLVER``), which the solution reports in
``fallback``. Without host reads neither happens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradsurgery import gram as _gram
from gradsurgery import qp, sync
from gradsurgery.errors import NonFiniteGradientError, SolverError
from gradsurgery.functional import gem_host
from gradsurgery.functional.validation import check_no_autograd

__all__ = ["FALLBACK_SOLVER", "GEMMode", "GEMSolution", "gem_multipliers", "gem_project"]

GEMMode = Literal["gem", "agem"]
_MODES = ("gem", "agem")
FALLBACK_SOLVER = "daqp"
"""The exact host solver that replaces a device solution failing its certificate."""


class GEMSolution(NamedTuple):
    """Dual solution of one GEM step, as tensors on the Gram's device.

    Attributes:
        v: multipliers ``(t,)``; the projected gradient is ``x = g + Jᵀv`` (all zero when
            nothing is violated).
        violated: 0-d bool, whether any constraint was violated (``(Jg)_k < 0``; for
            A-GEM, ``g·ḡ < 0``), i.e. whether ``x ≠ g``.
        kkt_residual: 0-d, the certificate of :func:`gradsurgery.qp.kkt_residual` (0 when
            not violated).
        fallback: 0-d bool, whether the solver's solution failed its certificate and was
            replaced by ``FALLBACK_SOLVER``'s (only checked when values are read on the host;
            see :func:`check_solution`).
    """

    v: Tensor
    violated: Tensor
    kkt_residual: Tensor
    fallback: Tensor


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
        The multipliers, whether a constraint was violated, the KKT residual and
        ``fallback`` false (:func:`check_solution` sets it). When the solver runs on the
        device (``"closed_form"``, ``"enumerate"``), nothing is copied to the host; a
        float64 Gram on the CPU is solved there, in NumPy (:func:`gradsurgery.qp.on_host`),
        by the same algorithm. A host backend always answers (see
        :func:`gradsurgery.qp.solve_lower_bounded`).

    Raises:
        ValueError: bad options, or ``gram`` requires grad while grad mode is on (the
            solve is not differentiable: pass ``gram.detach()``).
    """
    check_options(margin, mode, eps)
    check_no_autograd("gem_multipliers", gram=gram)
    if gram.dim() == 2 and gram.shape[0] > 1 and qp.on_host(gram):
        host = gem_host.multipliers(gram.numpy(force=True), margin, mode, solver, eps)
        return GEMSolution(
            torch.from_numpy(host[0]),
            torch.from_numpy(np.array(host[1])),
            torch.from_numpy(np.array(host[2])),
            torch.from_numpy(np.array(False)),
        )
    b = gram[1:, 0]
    K = gram[1:, 1:]
    t = b.shape[0]
    if t == 0:  # nothing to keep: x = g
        no = b.new_zeros((), dtype=torch.bool)
        return GEMSolution(b, no, b.new_zeros(()), no)
    # the size of the terms of x = g + Jᵀv when every v_k sits at its bound m
    unit = gram[0, 0].clamp(min=0).sqrt() + margin * K.diagonal().clamp(min=0).sqrt().sum()
    if eps:
        K = K + eps * torch.eye(t, dtype=K.dtype, device=K.device)
    if mode == "agem":
        b_ref = (b.sum() / t).reshape(1)
        K_ref = (K.sum() / t**2).reshape(1, 1)
        violated = b_ref[0] < 0
        solution = qp.solve_lower_bounded(
            K_ref, b_ref, b_ref.new_full((1,), margin), "closed_form", unit
        )
        v = solution.v.expand(t) / t
    else:
        violated = (b < 0).any()
        lower = b.new_full((t,), margin)
        resolved = qp.resolve_solver(solver, t)
        if qp.is_host_solver(resolved) and not (bool(violated) and bool(gram.isfinite().all())):
            # The host solver needs the data on the host anyway; skip it when there is
            # nothing to solve (or nothing sane to solve: the caller reports non-finite input).
            no = torch.zeros((), dtype=torch.bool, device=b.device)
            return GEMSolution(torch.zeros_like(b), violated, b.new_zeros(()), no)
        solution = qp.solve_lower_bounded(K, b, lower, resolved, unit)
        v = solution.v
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    return GEMSolution(
        torch.where(violated, v, zero),
        violated,
        torch.where(violated, solution.kkt_residual, zero),
        torch.zeros((), dtype=torch.bool, device=v.device),
    )


class CheckedSolution(NamedTuple):
    """What :func:`check_solution` read and decided."""

    finite: bool
    violated: bool
    gram: Tensor
    solution: GEMSolution
    bound: float
    """``‖g‖ + Σ_k |v_k| ‖g_k‖``: no entry of ``x = g + Jᵀv`` (nor a partial sum) exceeds it."""


def check_solution(
    gram: Tensor,
    solution: GEMSolution,
    margin: float,
    *,
    mode: GEMMode,
    solver: str,
    eps: float,
    exact_gram: Callable[[], Tensor],
    n: int,
    dtypes: Iterable[torch.dtype],
    validate: bool,
) -> CheckedSolution:
    """Read a step's outcome on the host (one read) and make sure of it before it is applied.

    1. If the Gram may have underflowed (:func:`gradsurgery.gram.underflow_suspected`)
       or is not finite, it is replaced by ``exact_gram()`` and the dual solved again (a
       second read): finite gradients whose squares overflow fp32 are then accepted. So
       is a Gram accumulated in fp32 whose solution fails its certificate: near-dependent
       constraints need multipliers so large that its rounding shows in ``Kv + b``.
    2. Non-finite input (or a Gram that overflows even float64) is reported in ``finite``
       (nothing else is checked then): the caller raises or skips the step.
    3. A solution that fails its certificate (KKT residual above
       :func:`gradsurgery.qp.kkt_tolerance`) is replaced by ``FALLBACK_SOLVER``'s, flagged
       in ``solution.fallback``; with ``validate``, if even that fails, :class:`SolverError`.

    Args:
        gram: the step's ``(t + 1, t + 1)`` Gram.
        solution: its dual solution, from :func:`gem_multipliers`.
        margin: as for :func:`gem_multipliers`.
        mode: as for :func:`gem_multipliers`.
        solver: as for :func:`gem_multipliers`.
        eps: as for :func:`gem_multipliers`.
        exact_gram: recomputes the Gram without underflow (reads the gradients again).
        n: number of columns the Gram was summed over.
        dtypes: the gradients' dtypes.
        validate: raise :class:`SolverError` for a solution that no solver could certify.
    """
    dtypes = list(dtypes)
    threshold = _gram.underflow_threshold(n, dtypes)
    finite, violated, kkt, tiny, bound = _read(gram, solution, threshold)
    if tiny or not finite:  # underflow, or fp32 squares above 3e38 from finite gradients
        gram = exact_gram()
        solution = gem_multipliers(gram, margin, mode=mode, solver=solver, eps=eps)
        finite, violated, kkt, _, bound = _read(gram, solution, threshold)
    if not finite:
        return CheckedSolution(False, bool(violated), gram, solution, math.inf)
    tolerance = qp.kkt_tolerance(gram.shape[0] - 1, dtypes)
    if violated and not kkt <= tolerance and not (tiny or _gram.is_exact(dtypes)):
        # The fp32-accumulated Gram is too coarse for these multipliers (near-dependent
        # constraints make them large, and its rounding grows with them): solve the
        # problem of the float64 Gram instead.
        gram = exact_gram()
        solution = gem_multipliers(gram, margin, mode=mode, solver=solver, eps=eps)
        tolerance = qp.kkt_tolerance(gram.shape[0] - 1, [torch.float64])
        _, _, kkt, _, bound = _read(gram, solution, 0.0)
    resolved = qp.resolve_solver(solver, gram.shape[0] - 1)
    if violated and not kkt <= tolerance and mode == "gem" and resolved != FALLBACK_SOLVER:
        exact = gem_multipliers(gram, margin, mode=mode, solver=FALLBACK_SOLVER, eps=eps)
        solution = exact._replace(fallback=torch.ones_like(exact.fallback))
        _, _, kkt, _, bound = _read(gram, solution, 0.0)
    if validate and not kkt <= tolerance:
        raise SolverError(
            f"the GEM dual could not be solved to a certified tolerance (KKT residual "
            f"{kkt:.2e} > {tolerance:.1e}, solver {solver!r}, exact fallback "
            f"{FALLBACK_SOLVER!r} included); nothing was changed. The constraint gradients "
            "are nearly opposite (the multipliers needed are too large for float64): skip "
            "this step, or merge or drop the nearly opposite constraints"
        )
    return CheckedSolution(True, bool(violated), gram, solution, bound)


def _read(
    gram: Tensor, solution: GEMSolution, threshold: float
) -> tuple[bool, bool, float, bool, float]:
    """``(finite, violated, kkt_residual, tiny, bound)`` in one host read (``gem_host.read``)."""
    if qp.on_host(gram, solution.v):
        v = solution.v.numpy(force=True)
        return gem_host.read(
            gram.numpy(force=True), v, solution.violated, solution.kkt_residual, threshold
        )
    norms = gram.diagonal().clamp(min=0).sqrt()
    bound = norms[0] + (solution.v.abs() * norms[1:]).sum()
    tiny = (gram.diagonal() < threshold).any()
    flags = [gram.isfinite().all(), solution.violated, solution.kkt_residual, tiny, bound]
    finite, violated, kkt, suspected, bound_value = torch.stack(flags).tolist()
    return bool(finite), bool(violated), kkt, bool(suspected), bound_value if finite else math.inf


def raise_non_finite() -> None:
    """Raise the error for non-finite gradients (before the step changes anything)."""
    raise NonFiniteGradientError(
        "a gradient holds NaN or Inf values (or its squared norm overflows); nothing "
        "was changed. Check the losses of this step, or pass a GradScaler to skip such "
        "steps"
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
            input, and certify the solution (:func:`check_solution`: an underflowed Gram
            is recomputed, an uncertified solution re-solved by ``FALLBACK_SOLVER``,
            :class:`~gradsurgery.errors.SolverError` if that fails too). On an
            accelerator this reads four numbers back to the host (more in those rare
            cases); with ``False`` the call is free of host synchronisation (given a
            device solver), checks nothing, and always returns a new tensor.

    Returns:
        ``x = grad + constraintsᵀ v``, same shape, dtype and device as ``grad``. When no
        constraint is violated and that is known on the host (CPU tensors, or
        ``validate=True``), ``grad`` itself is returned: no copy.

    Raises:
        ValueError: shapes, devices or dtypes that do not match, bad options, or an input
            that requires grad while grad mode is on (the projection is not differentiated
            through: pass ``grad.detach()`` and ``constraints.detach()``).
        NonFiniteGradientError: NaN or Inf input (with ``validate``).
        SolverError: no solver could certify the solution (with ``validate``).
    """
    check_options(margin, mode, eps)
    check_no_autograd("gem_project", grad=grad, constraints=constraints)
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
    gram[0, 0] = _gram.cross(grad[None], grad)[0]
    solution = gem_multipliers(gram, margin, mode=mode, solver=solver, eps=eps)
    if validate:
        checked = check_solution(
            gram,
            solution,
            margin,
            mode=mode,
            solver=solver,
            eps=eps,
            exact_gram=lambda: _gram.exact_gram(torch.cat([grad[None], constraints])),
            n=grad.shape[0],
            dtypes=[grad.dtype],
            validate=True,
        )
        if not checked.finite:
            raise_non_finite()
        if not checked.violated:
            return grad
        solution = checked.solution
        x = _gram.combine_(grad.clone(), constraints, solution.v, accumulate=True)
        if checked.bound > torch.finfo(grad.dtype).max and not bool(x.isfinite().all()):
            raise NonFiniteGradientError(
                f"the projection overflows {grad.dtype}: an entry would be Inf although "
                "every gradient is finite; project in a wider dtype (grad.float())"
            )
        return x
    if sync.host_reads_are_free(grad.device) and not bool(solution.violated):
        return grad
    return _gram.combine_(grad.clone(), constraints, solution.v, accumulate=True)

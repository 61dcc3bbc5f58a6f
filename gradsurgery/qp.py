r"""Small quadratic programs with lower bounds, solved exactly.

:func:`solve_lower_bounded` solves

.. math::

    \min_v \tfrac12 v^\top K v + b^\top v \quad \text{s.t.} \quad v \ge \ell

for a positive semi-definite ``K`` of size ``t × t``: the dual of a projection onto a
polyhedral cone (GEM). Solvers:

``"closed_form"``
    ``t = 1`` only: ``v = max(ℓ, −b/K)``.
``"enumerate"``
    Exact, on an accelerator without host synchronisation: every one of the
    :math:`2^t` choices of free variables gives a linear system; the answer is the
    candidate with the best certificate (:func:`kkt_residual`), which no candidate with
    huge multipliers from a singular system can pass. All candidates are solved in one
    batched call, so the cost is a fixed number of kernel launches whatever the data.
    ``"auto"`` picks it for ``2 ≤ t ≤ MAX_ENUMERATE``.
any qpsolvers backend (``"daqp"``, ``"quadprog"``, ``"osqp"``, ``"clarabel"``, ...)
    On the CPU in float64 (for accelerator tensors, one device-to-host copy of ``t² + t``
    numbers), then finished exactly by active-set (Lawson–Hanson) steps started from the
    backend's solution (or from the bounds, where the backend gave none).
    ``"daqp"``, which ``"auto"`` picks for ``t > MAX_ENUMERATE``, is exact
    and accepts a singular ``K``; ``"quadprog"`` needs ``K`` positive definite; ``"osqp"``
    and ``"clarabel"`` run with tightened tolerances. See ``docs/solvers.md`` for the measured
    accuracy and time of each.

Where the values are already on the host (float64 CPU tensors, :func:`on_host`), every
solver runs the same algorithm in NumPy float64 instead (:mod:`gradsurgery.qp_host`): the
problem is a few hundred numbers at most, and a NumPy operation on them costs a fraction of
a torch operation's dispatch. Rounding aside, the answer is the same.

Before solving, the problem is rescaled to a unit diagonal and ``max |b| = 1`` (a zero row
keeps a unit scale). The solution is invariant to that rescaling, and the solvers'
absolute tolerances then mean the same thing whether gradients are of size 1e-6 or 1e3.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from gradsurgery import qp_host, sync
from gradsurgery.qp_host import backend_solve

__all__ = [
    "KKT_TOLERANCE",
    "MAX_ENUMERATE",
    "QPSolution",
    "backend_solve",
    "is_host_solver",
    "kkt_residual",
    "kkt_tolerance",
    "on_host",
    "resolve_solver",
    "solve_lower_bounded",
]

MAX_ENUMERATE = 8
KKT_TOLERANCE = 1e-6
"""The largest relative KKT residual a step accepts before raising :class:`SolverError`,
where the Gram matrix is exact enough for it (see :func:`kkt_tolerance`)."""


def kkt_tolerance(t: int, gradient_dtypes: Iterable[torch.dtype]) -> float:
    """The KKT residual a solve of ``t`` variables must reach, given the gradients' dtypes.

    ``KKT_TOLERANCE``, unless the Gram matrix is too coarse for it: it is accumulated in
    fp32 for fp32/fp16/bf16 gradients, and its rounding alone moves the residual by up to
    about ``t·ε`` (measured 1.6e-6 for five constraints in three dimensions, where the
    rounded Gram is indefinite). The bound is then ``8·t·ε``.
    """
    dtypes = list(gradient_dtypes)
    exact = bool(dtypes) and all(dtype == torch.float64 for dtype in dtypes)
    eps = torch.finfo(torch.float64 if exact else torch.float32).eps
    return max(KKT_TOLERANCE, 8 * t * eps)


_EPS = torch.finfo(torch.float64).eps


class QPSolution(NamedTuple):
    """Minimiser ``v`` and its KKT residual (relative, in the rescaled problem)."""

    v: Tensor
    kkt_residual: Tensor


class _Scaled(NamedTuple):
    """The problem in ``u = s ⊙ v``: unit diagonal, ``max |b| = 1``."""

    K: Tensor
    b: Tensor
    lower: Tensor
    s: Tensor


class _Subsets(NamedTuple):
    free: Tensor  # (2^t, t): 1 where the variable is free (solved for), 0 where at its bound
    fixed: Tensor  # 1 - free
    pairs: Tensor  # (2^t, t, t): free ⊗ free
    identity: Tensor  # (2^t, t, t): diag(fixed)


@functools.lru_cache(maxsize=64)
def _subsets(t: int, device: torch.device) -> _Subsets:
    codes = torch.arange(2**t, device=device).unsqueeze(1)
    bits = 2 ** torch.arange(t, device=device)
    free = ((codes & bits) != 0).to(torch.float64)
    fixed = 1 - free
    return _Subsets(free, fixed, free[:, :, None] * free[:, None, :], torch.diag_embed(fixed))


def _scale(K: Tensor, b: Tensor, lower: Tensor) -> _Scaled:
    d = K.diagonal().sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    bn = b / d
    scale = bn.abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s = d / scale
    return _Scaled(K / (d[:, None] * d[None, :]), bn / scale, lower * s, s)


def _certificate(problem: _Scaled, u: Tensor) -> Tensor:
    """The certificate of :func:`kkt_residual` for candidates ``u`` of shape ``(..., t)``."""
    K, b, lower = problem.K, problem.b, problem.lower
    r = u @ K.T + b
    # What float64 rounding may have hidden in r: a candidate with huge multipliers (a
    # singular system solved as if it were not) has a tiny computed r but a large bound.
    rounding = (K.shape[0] + 4) * _EPS * (u.abs() @ K.abs().T + b.abs())
    slack = u - lower
    worst = torch.stack(
        [
            slack.neg().clamp(min=0),
            (rounding - r).clamp(min=0),
            torch.minimum(slack, r.abs() - rounding).clamp(min=0),
        ]
    )
    return worst.amax(dim=(0, -1))


def _unit_ratio(K: Tensor, b: Tensor, unit: Tensor | None) -> Tensor:
    """``max_k |b_k| / sqrt(K_kk)`` over ``unit`` (at most 1): the certificate's change of unit.

    The solvers work with ``max |b| = 1``; rescaling the problem to ``unit`` instead
    multiplies ``u``, ``Ku + b`` and the rounding bound alike, hence the certificate.
    """
    if unit is None:
        return torch.ones((), dtype=b.dtype, device=b.device)
    d = K.diagonal().sqrt()
    scale = (b / torch.where(d > 0, d, torch.ones_like(d))).abs().amax()
    return torch.where(unit > scale, scale / unit, torch.ones_like(scale))


def kkt_residual(
    K: Tensor, b: Tensor, lower: Tensor, v: Tensor, unit: Tensor | None = None
) -> Tensor:
    r"""Certificate of optimality of ``v`` (0 at the optimum, up to rounding).

    Measured in the rescaled problem (unit diagonal, ``|b_k| / sqrt(K_kk)`` divided by
    ``unit``, default its maximum), without dividing by the size of ``v``, as the largest of

    * bound violation :math:`(\ell_k - v_k)_+`,
    * infeasibility :math:`(e_k - r_k)_+` of :math:`r = Kv + b`, where :math:`e_k` bounds
      the float64 rounding of :math:`r_k` (so huge multipliers cannot hide a violation),
    * complementarity :math:`\min(v_k - \ell_k, (|r_k| - e_k)_+)`.

    For GEM's dual, :math:`r_k = \langle g_k, x \rangle` and ``unit`` is
    :math:`\lVert g \rVert` (plus :math:`m \sum_k \lVert g_k \rVert` with a margin
    :math:`m`): the rescaling divides :math:`r_k` by :math:`\lVert g_k \rVert` times it, so
    a residual :math:`\le \tau` certifies
    :math:`\langle g_k, x \rangle \ge -\tau \lVert g \rVert \lVert g_k \rVert` for every
    constraint (without a margin), with every multiplier above its bound on a
    constraint active to within the same tolerance. A convex QP has no other KKT points than
    its minimisers, so this certifies the solution.
    """
    problem = _scale(K, b, lower)
    return _certificate(problem, v * problem.s) * _unit_ratio(K, b, unit)


def _enumerate(problem: _Scaled) -> tuple[Tensor, Tensor]:
    """The candidate the certificate trusts most, and its certificate."""
    K, b, lower = problem.K, problem.b, problem.lower
    subsets = _subsets(K.shape[0], K.device)
    A = K * subsets.pairs + subsets.identity
    pinned = subsets.fixed * lower
    rhs = subsets.free * -(b + pinned @ K) + pinned
    u, info = torch.linalg.solve_ex(A, rhs)
    u = torch.where(torch.isfinite(u) & (info == 0)[:, None], u, lower).maximum(lower)
    # Every candidate that passes the certificate is a minimiser (a convex QP has no other
    # KKT points); the one the certificate trusts most is kept. Exactly singular subsets
    # (dependent constraints) either fail or tie with a nonsingular one.
    certificates = _certificate(problem, u)
    best = certificates.argmin().reshape(1)
    return u.index_select(0, best).squeeze(0), certificates.index_select(0, best).squeeze(0)


def _qpsolvers(problem: _Scaled, solver: str) -> Tensor:
    host = qp_host.Problem(*(x.detach().cpu().numpy() for x in problem))
    u = qp_host.backend_solution(host, solver)
    return torch.from_numpy(u).to(problem.K.device)


def on_host(*tensors: Tensor) -> bool:
    """Whether a solve on these tensors runs on the host, in NumPy (:mod:`gradsurgery.qp_host`).

    It does for float64 tensors whose values the host reads for free
    (:func:`gradsurgery.sync.host_reads_are_free`: the CPU) as NumPy arrays: not requiring
    grad while grad mode is on (the NumPy path has no derivative), and not the batched
    stand-ins of ``torch.vmap``, which hold no memory. Everything else takes the torch
    path, sync-free on an accelerator.
    """
    for x in tensors:
        if (
            x.dtype != torch.float64
            or (x.requires_grad and torch.is_grad_enabled())
            or not sync.host_reads_are_free(x.device)
            or torch._C._functorch.is_functorch_wrapped_tensor(x)
        ):
            return False
    return True


def is_host_solver(solver: str) -> bool:
    """Whether a resolved solver name runs on the host (reads the problem back from the device)."""
    return solver not in ("closed_form", "enumerate")


def resolve_solver(solver: str, t: int) -> str:
    """The solver ``"auto"`` stands for with ``t`` constraints; other names are checked.

    Raises:
        ValueError: ``"closed_form"`` with ``t ≠ 1``, or a name that is neither a solver of
            this module nor an installed qpsolvers backend.
    """
    if solver == "auto":
        if t == 1:
            return "closed_form"
        return "enumerate" if t <= MAX_ENUMERATE else "daqp"
    if solver == "closed_form" and t != 1:
        raise ValueError(f"solver 'closed_form' needs exactly one constraint, got {t}")
    if is_host_solver(solver):
        import qpsolvers

        if solver not in qpsolvers.available_solvers:
            raise ValueError(
                f"solver {solver!r} is not installed; choose 'auto', 'enumerate', "
                f"'closed_form' (t = 1) or a qpsolvers backend: "
                f"{', '.join(map(repr, sorted(qpsolvers.available_solvers)))}"
            )
    return solver


def solve_lower_bounded(
    K: Tensor, b: Tensor, lower: Tensor, solver: str = "auto", unit: Tensor | None = None
) -> QPSolution:
    """Solve ``min ½ vᵀKv + bᵀv  s.t.  v ≥ lower`` exactly.

    Args:
        K: ``(t, t)`` positive semi-definite matrix, float64.
        b: ``(t,)`` float64.
        lower: ``(t,)`` float64 lower bounds.
        solver: ``"auto"`` (see :func:`resolve_solver`), ``"closed_form"`` (``t = 1``),
            ``"enumerate"`` (any ``t``, but ``2^t`` linear systems), or a qpsolvers backend.
        unit: 0-d, the problem's own scale, at least ``|b_k| / sqrt(K_kk)`` for every ``k``
            (``‖g‖ + m Σ_k ‖g_k‖`` for GEM's dual); the certificate is relative to it. Default: the
            largest ``|b_k| / sqrt(K_kk)``, which is stricter.

    Returns:
        The minimiser and its KKT residual (see :func:`kkt_residual`), on ``K``'s device.
        With ``"closed_form"`` and ``"enumerate"`` nothing is copied to the host; float64
        CPU tensors (:func:`on_host`) are solved by the same algorithm in NumPy
        (:mod:`gradsurgery.qp_host`). A qpsolvers backend that gives no answer (an
        fp32-accumulated ``K`` of dependent rows is indefinite by its rounding) is given a
        nearby convex problem, and if it fails on that too, the active-set finish starts from
        the bounds: there is always an answer, and its certificate says how good it is.

    Raises:
        ValueError: unknown or uninstalled solver.
    """
    solver = resolve_solver(solver, K.shape[0])
    if on_host(K, b, lower) and (unit is None or on_host(unit)):
        host = qp_host.solve(
            K.numpy(force=True),
            b.numpy(force=True),
            lower.numpy(force=True),
            solver,
            None if unit is None else float(unit),
        )
        return QPSolution(torch.from_numpy(host[0]), torch.tensor(host[1], dtype=torch.float64))
    problem = _scale(K, b, lower)
    if solver == "enumerate":
        u, certificate = _enumerate(problem)
    else:
        if solver == "closed_form":
            u = torch.maximum(problem.lower, -problem.b)
        else:
            u = _qpsolvers(problem, solver)
        certificate = _certificate(problem, u)
    v = torch.maximum(u / problem.s, lower)  # undo the rescaling without rounding below a bound
    return QPSolution(v, certificate * _unit_ratio(K, b, unit))

"""The library's wrappers as the benchmark runs them: a surgery split into Gram, solve, apply.

Each case builds one wrapper on BERT-shaped parameters, fills its rows, and exposes its
whole surgery (``opt._surgery``, what ``opt.step()`` runs before the inner step) and the
same work in three parts, with the library's own functions on the same rows:

* **gram**: ``bank.gram()`` (``bank.segment_gram`` for per-parameter GradVac); none
  for Uniform, which computes no Gram matrix;
* **solve**: the weights from that Gram (``gem_multipliers``, or the wrapper's ``_decide``:
  PCGrad's and GradVac's coefficients, MGDA's min-norm point, LF-MLF's QP on the host;
  Uniform's ``1/T``);
* **apply**: ``.grad ← g + Jᵀv`` (GEM) or ``Jᵀw`` (the others) written in place (Uniform's
  checked as it is written), and for LF-MLF ``ḡ += d``.

The **floor** of a case is the number of values its surgery must move: ``(2t + 3)·p`` for
GEM and A-GEM (read ``[g; J]`` for the Gram, read it again and write ``x``),
``(2T + 1)·p`` for the multi-objective wrappers, ``(T + 1)·p`` for Uniform (read the rows
once, write ``d``) and ``(2T + 4)·p`` for LF-MLF (which also reads ``ḡ`` with the rows,
and reads and writes it once more to add ``d``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradsurgery import (
    MGDA,
    GEMProjector,
    GradVac,
    ParetoLessForgetting,
    PCGrad,
    PhasedLR,
    Uniform,
)
from gradsurgery.bench.workload import bert_like_params, conflicting_task, objective_rows
from gradsurgery.functional.gem import gem_multipliers
from gradsurgery.functional.gradvac import gradvac_coefficients
from gradsurgery.functional.pcgrad import conflict_orders
from gradsurgery.layers import LayerSets
from gradsurgery.wrappers.multi import MultiObjectiveOptimizer

__all__ = ["METHODS", "MULTI", "Case", "build", "phased_steps"]

MULTI = ("uniform", "pcgrad", "gradvac", "gradvac-param", "mgda", "lfmlf")
METHODS = ("gem", "agem", *MULTI, "phased")
SEED = 0
Step = Callable[[], Any]


@dataclass
class Case:
    """One wrapper with filled rows, ready to be timed.

    Attributes:
        opt: the wrapper.
        rows: its gradient rows (constraints or objectives), for the peers.
        setup: puts ``.grad`` back as the backward passes left it (untimed, before each call).
        parts: ``{"gram", "solve", "apply"}`` callables (no ``"gram"`` where the surgery
            computes none); ``solve`` and ``apply`` use a Gram and weights computed once
            beforehand.
        floor_values: values per parameter the surgery must move.
        extra_bytes: what the wrapper keeps beyond ``.grad`` (its rows).
    """

    opt: GEMProjector | MultiObjectiveOptimizer
    rows: Tensor
    setup: Step
    parts: dict[str, Step]
    floor_values: int
    extra_bytes: int

    def surgery(self) -> None:
        """The whole surgery, as ``opt.step()`` runs it before the inner step."""
        self.opt._surgery()

    def direction(self) -> Tensor:
        """``.grad`` after one surgery from the backward passes' state (flattened)."""
        self.setup()
        self.opt._surgery()
        return self.opt.bank.blocks[0][0].clone()

    def release(self) -> None:
        """Let the buffer go before the next case allocates its own."""
        for p in self.opt.bank.params:
            p.grad = None


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def _gem(params: list[Tensor], t: int, validate: bool, mode: str) -> Case:
    opt = GEMProjector(
        torch.optim.SGD(params, lr=1e-3),
        constraints=t,
        mode="agem" if mode == "agem" else "gem",
        validate=validate,
    )
    bank = opt.bank
    (block,) = bank.blocks
    conflicting_task(block)
    task = block[0].clone()

    def setup() -> None:
        block[0].copy_(task)

    gram = bank.gram()
    solution = gem_multipliers(gram, opt.margin, mode=opt.mode, solver=opt.solver, eps=opt.eps)
    parts: dict[str, Step] = {
        "gram": bank.gram,
        "solve": lambda: gem_multipliers(
            gram, opt.margin, mode=opt.mode, solver=opt.solver, eps=opt.eps
        ),
        "apply": lambda: bank.combine_(solution.v, accumulate=True),
    }
    return Case(opt, block[1:], setup, parts, 2 * t + 3, block[1:].numel() * block.element_size())


def _multi_factory(method: str, t: int, validate: bool) -> Callable[[list[Tensor]], Any]:
    def sgd(params: list[Tensor]) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=1e-3)

    factories: dict[str, Callable[[list[Tensor]], MultiObjectiveOptimizer]] = {
        "uniform": lambda q: Uniform(sgd(q), t, validate=validate),
        "pcgrad": lambda q: PCGrad(sgd(q), t, generator=_generator(), validate=validate),
        "gradvac": lambda q: GradVac(sgd(q), t, generator=_generator(), validate=validate),
        "gradvac-param": lambda q: GradVac(
            sgd(q), t, granularity="parameter", generator=_generator(), validate=validate
        ),
        "mgda": lambda q: MGDA(sgd(q), t, validate=validate),
        "lfmlf": lambda q: ParetoLessForgetting(sgd(q), t, validate=validate),
    }
    return factories[method]


def _multi(params: list[Tensor], t: int, validate: bool, method: str) -> Case:
    opt: MultiObjectiveOptimizer = _multi_factory(method, t, validate)(params)
    bank = opt.bank
    (block,) = bank.blocks
    rows = opt._objective_rows
    objective_rows(block[rows])
    if isinstance(opt, ParetoLessForgetting):
        block[t + 1].copy_(block[rows].sum(dim=0))  # ḡ: some earlier steps' directions

    def setup() -> None:  # a step starts with .grad zero, as zero_grad() leaves it
        block[0].zero_()
        bank.mark_row0_zero()

    setup()
    extra_bytes = block[1:].numel() * block.element_size()
    if isinstance(opt, Uniform):
        weights = opt._weights()
        parts: dict[str, Step] = {
            "solve": opt._weights,
            "apply": lambda: opt._write_checked(bank, weights),
        }
        return Case(opt, block[rows], setup, parts, t + 1, extra_bytes)
    gram = bank.gram()
    per_parameter = isinstance(opt, GradVac) and opt.granularity == "parameter"
    if per_parameter:
        assert isinstance(opt, GradVac)
        segments = bank.segment_gram(rows)

        def gram_part() -> None:
            bank.segment_gram(rows)  # the model's Gram is their sum

        def solve() -> Tensor:
            orders = conflict_orders(t, opt.generator)
            return gradvac_coefficients(segments, opt.targets, orders, opt.beta)[0].sum(dim=-2)

        weights = solve()
        parts = {
            "gram": gram_part,
            "solve": solve,
            "apply": lambda: bank.combine_segments_(weights, rows=rows),
        }
    else:
        decision = opt._decide(gram)

        def apply() -> None:
            bank.combine_(decision.weights, accumulate=False, rows=rows)
            opt._after_apply()

        parts = {
            "gram": lambda: bank.gram(rows=slice(1, None)),
            "solve": lambda: opt._decide(gram),
            "apply": apply,
        }
    values = 2 * t + 4 if isinstance(opt, ParetoLessForgetting) else 2 * t + 1
    return Case(opt, block[rows], setup, parts, values, extra_bytes)


def build(
    method: str, p: int, t: int, device: torch.device, dtype: torch.dtype, validate: bool
) -> Case:
    """The case of ``method`` (one of :data:`METHODS` but ``"phased"``) at size ``p``.

    Raises:
        ValueError: an unknown method, or a multi-objective method with ``t < 2``.
    """
    params: list[Tensor] = [q for _, q in bert_like_params(p, device, dtype)]
    if method in ("gem", "agem"):
        return _gem(params, t, validate, method)
    if method not in MULTI:
        raise ValueError(f"method must be one of {METHODS[:-1]}, got {method!r}")
    if t < 2:
        raise ValueError(f"{method} combines T ≥ 2 objectives, got {t}")
    return _multi(params, t, validate, method)


def phased_steps(p: int, device: torch.device, dtype: torch.dtype) -> tuple[Step, Step, Step]:
    """``(phased step, inner step, release)``: a ``PhasedLR``-wrapped SGD step and the bare one.

    Their difference is PhasedLR's bookkeeping (phase detection, per-group rates); it
    touches no gradient, so it has no bandwidth floor.
    """
    named = bert_like_params(p, device, dtype)
    for _, q in named:
        q.grad = torch.zeros_like(q)
    inner = torch.optim.SGD([q for _, q in named], lr=1e-3)
    opt = PhasedLR(inner, LayerSets(named, "bert"))
    losses = iter(torch.linspace(2.0, 1.0, 100_000).tolist())

    def phased() -> None:
        opt.observe(next(losses))
        opt.step()

    def release() -> None:
        for _, q in named:
            q.grad = None

    return phased, inner.step, release

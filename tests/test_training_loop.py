"""A hypothesis state machine that plays the user of a wrapper, against a plain-torch twin.

Each machine drives random sequences of what training loops do to a small model wrapped in
:class:`~gradsurgery.GEMProjector` (t = 1..3 constraints, margin 0 or 0.5, GEM or A-GEM) or
in a multi-objective wrapper (MGDA, ParetoLessForgetting): task and constraint / objective
backward passes reaching a subset of the layers, accumulated over one or two micro-batches,
sometimes with an Inf; ``zero_grad`` through the wrapper, the model and the inner optimizer
with ``set_to_none`` either way; freezing and unfreezing layers; ``channels_last`` and
``.double()`` after wrapping; ``GradScaler`` steps (a power-of-two scale, so that scaled and
unscaled gradients are bit-identical); clipping and replacing ``p.grad`` after
``apply_surgery()``; ``add_param_group``; saving and loading into fresh objects.

:class:`tests.loop_reference.Reference` does the same with a plain optimizer and an
independent float64 surgery. After every rule each parameter must equal its twin
(float64: ``rtol=1e-9, atol=1e-12``; once a model has been float32: ``rtol=2e-4,
atol=1e-5``), and after every step so must the inner optimizer's state and the scale.
Where the library may refuse (a misuse, or a change of the model it cannot follow) it must
raise a documented error (a ``gradsurgery.errors`` class, or a message quoted in
docs/faq.md) with parameters, ``.grad`` and optimizer state unchanged; the machine then
rebuilds the wrapper from the twin's state and goes on.

``GRADSURGERY_LONG=1`` runs many more and longer sequences (for releases, see
docs/contributing.md). Run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from gradsurgery import MGDA, GEMProjector, ParetoLessForgetting
from gradsurgery.wrappers.surgery import SurgeryOptimizer
from tests.loop_machine import TrainingLoop, layer_sets, rare, seeds
from tests.loop_reference import STATIONARITY_TOL, Plan, loss

LONG = os.environ.get("GRADSURGERY_LONG") == "1"
LOOP_SETTINGS = settings(
    max_examples=1000 if LONG else 40,
    stateful_step_count=60 if LONG else 30,
    deadline=None,
)


class GEMLoop(TrainingLoop):
    """:class:`~gradsurgery.GEMProjector` against NNLS (Lopez-Paz & Ranzato, 2017;
    Chaudhry et al., 2019 for A-GEM)."""

    row_kind = "constraint"

    @initialize(
        seed=seeds,
        dtype=st.sampled_from([torch.float64, torch.float32]),
        inner=st.sampled_from(["sgd", "adamw"]),
        scaler=st.sampled_from(["none", "passed", "unpassed"]),
        rows=st.integers(1, 3),
        margin=st.sampled_from([0.0, 0.5]),
        mode=st.sampled_from(["gem", "agem"]),
    )
    def setup(
        self,
        seed: int,
        dtype: torch.dtype,
        inner: str,
        scaler: str,
        rows: int,
        margin: float,
        mode: str,
    ) -> None:
        self.margin, self.mode = margin, mode
        self._setup(seed, dtype, inner, scaler, rows)
        note(f"GEM margin={margin} mode={mode}")

    def _wrap(self, inner: torch.optim.Optimizer) -> SurgeryOptimizer[Any]:
        return GEMProjector(
            inner,
            self.margin,
            constraints=self.n_rows,
            mode=self.mode,  # type: ignore[arg-type]
            grad_scaler=self._passed_scaler,
        )

    def _plan(self) -> Plan:
        return self.ref.gem_plan(self.margin, self.mode, self.scaler is not None)

    @precondition(lambda self: not self.need_zero)
    @rule(seed=seeds, parts=layer_sets, micro=st.booleans(), inf=rare)
    def task_backward(self, seed: int, parts: frozenset[str], micro: bool, inf: bool) -> None:
        """The task loss's backward pass into ``.grad``."""
        note(f"task: parts={sorted(self._allowed(parts))} micro={micro} inf={inf}")
        self._plain_backward(seed, parts, micro, inf)

    @precondition(lambda self: not self.need_zero)
    @rule(k=st.integers(0, 2), seed=seeds, parts=layer_sets, micro=st.booleans(), inf=rare)
    def constraint_backward(
        self, k: int, seed: int, parts: frozenset[str], micro: bool, inf: bool
    ) -> None:
        """A memory loss's backward pass inside ``with opt.constraint(k):``."""
        self._row_backward(k, seed, parts, micro, inf)

    @precondition(lambda self: not self.need_zero)
    @rule(seed=seeds, parts=layer_sets)
    def all_constraints_backward(self, seed: int, parts: frozenset[str]) -> None:
        """One backward pass inside each constraint's block, in order."""
        for k in range(self.n_rows):
            if self.need_zero:
                return
            self._row_backward(k, seed + 7 * k, parts, micro=False, inf=False)

    def _backward_every_row(self, seed: int, parts: frozenset[str], inf: bool) -> None:
        self.task_backward(seed, parts, micro=False, inf=inf)
        self.all_constraints_backward(seed + 1, parts)


class MultiLoop(TrainingLoop):
    """MGDA (Sener & Koltun, 2018) or ParetoLessForgetting (Mao et al., 2022) against
    brute-force enumeration of their quadratic programs."""

    row_kind = "objective"

    @initialize(
        seed=seeds,
        dtype=st.sampled_from([torch.float64, torch.float32]),
        inner=st.sampled_from(["sgd", "adamw"]),
        scaler=st.sampled_from(["none", "passed", "unpassed"]),
        rows=st.integers(2, 3),
        method=st.sampled_from(["mgda", "lfmlf"]),
    )
    def setup(
        self, seed: int, dtype: torch.dtype, inner: str, scaler: str, rows: int, method: str
    ) -> None:
        self.method = method
        self._setup(seed, dtype, inner, scaler, rows)
        note(f"method={method}")

    def _wrap(self, inner: torch.optim.Optimizer) -> SurgeryOptimizer[Any]:
        if self.method == "mgda":
            return MGDA(inner, self.n_rows, grad_scaler=self._passed_scaler)
        return ParetoLessForgetting(
            inner, self.n_rows, stationarity_tol=STATIONARITY_TOL, grad_scaler=self._passed_scaler
        )

    def _plan(self) -> Plan:
        return self.ref.multi_plan(self.method, self.scaler is not None, self.stray)

    @precondition(lambda self: not self.need_zero)
    @rule(k=st.integers(0, 2), seed=seeds, parts=layer_sets, micro=st.booleans(), inf=rare)
    def objective_backward(
        self, k: int, seed: int, parts: frozenset[str], micro: bool, inf: bool
    ) -> None:
        """One objective's backward pass inside ``with opt.objective(k):``."""
        self._row_backward(k, seed, parts, micro, inf)

    @precondition(lambda self: not self.need_zero)
    @rule(seed=seeds, parts=layer_sets)
    def backward_all(self, seed: int, parts: frozenset[str]) -> None:
        """``opt.backward([...])``: every objective's loss from one forward pass each."""
        parts = self._allowed(parts)
        note(f"backward all: parts={sorted(parts)}")
        shifts = [0.5 * (k + 1) for k in range(self.n_rows)]

        def lib() -> None:
            self.opt.backward(  # type: ignore[attr-defined]
                [self._scaled(loss(self.model, seed + k, parts, s)) for k, s in enumerate(shifts)]
            )

        if self._attempt(lib, None):
            for k, s in enumerate(shifts):
                self.ref.row_backward(k, loss(self.ref.model, seed + k, parts, s))
            self.touched = self.rows_touched = True
            self._check_outside_grads()
        else:
            self._abandon()

    def _backward_every_row(self, seed: int, parts: frozenset[str], inf: bool) -> None:
        self.backward_all(seed, parts)
        if inf and not self.need_zero:
            self._row_backward(0, seed + 1, parts, micro=False, inf=True)

    @precondition(lambda self: not self.need_zero and self.scaler is None)
    @rule(seed=seeds)
    def stray_backward(self, seed: int) -> None:
        """Misuse: a backward pass outside every objective block (the step must refuse)."""
        note("stray backward")
        self._plain_backward(seed, frozenset({"lin"}), micro=False, inf=False)
        self.stray = True


TestGEMLoop = GEMLoop.TestCase
TestGEMLoop.settings = LOOP_SETTINGS
TestMultiLoop = MultiLoop.TestCase
TestMultiLoop.settings = LOOP_SETTINGS

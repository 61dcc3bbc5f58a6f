"""A training loop written by hand with plain tensors, to check the wrappers against.

:class:`Reference` mirrors what a user's loop does to a model wrapped in a gradsurgery
optimizer, but with a plain ``torch.optim`` optimizer: ``.grad`` follows torch's own
semantics (``None`` until a backward pass reaches a parameter, ``zero_grad`` with
``set_to_none`` either way), the extra gradients (constraints, objectives) are collected
with ``torch.autograd.grad`` into per-parameter dictionaries, and the surgery is done in
float64 NumPy by the brute-force references of :mod:`tests.reference` (SciPy's NNLS for
GEM, active-set enumeration for MGDA and LF-MLF), sharing no code with the library's
solvers. A parameter that received no gradient this step in any row is handed ``None``,
as ``torch.optim`` expects. A ``GradScaler`` is modelled by its documented arithmetic
(skip and back off on a non-finite gradient, grow after ``growth_interval`` clean steps).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradsurgery import errors
from tests import reference

FAQ = (Path(__file__).resolve().parent.parent / "docs" / "faq.md").read_text()

LAYERS = ("lin", "conv", "unused", "extra")
BASE_LAYERS = ("lin", "conv", "unused")
SCALE = 2.0**8
GROWTH_INTERVAL = 2
STATIONARITY_TOL = 1e-4


class Net(nn.Module):
    """A linear layer, a convolution (for ``channels_last``), an unused branch, and a layer
    ``extra`` that only joins the optimizer through ``add_param_group``."""

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.conv = nn.Conv2d(2, 2, 2)
        self.unused = nn.Linear(3, 2)
        self.extra = nn.Linear(4, 3)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        self.to(dtype)


def loss(net: Net, seed: int, parts: frozenset[str], shift: float, inf: bool = False) -> Tensor:
    """A loss reaching the layers in ``parts``; ``inf`` gives ``lin.bias[0]`` an Inf gradient."""
    generator = torch.Generator().manual_seed(seed)
    dtype = net.lin.weight.dtype
    x = torch.randn(5, 4, generator=generator).to(dtype)
    total = torch.zeros((), dtype=dtype)
    if "lin" in parts:
        y = torch.randn(5, 3, generator=generator).to(dtype)
        total = total + (torch.tanh(net.lin(x)) - y - shift).square().mean()
    if "conv" in parts:
        image = torch.randn(3, 2, 3, 3, generator=generator).to(dtype)
        total = total + (torch.tanh(net.conv(image)) - shift).square().mean()
    if "extra" in parts:
        total = total + (torch.sin(net.extra(x)) - shift).square().mean()
    if inf:
        total = total + net.lin.bias[0] * float("inf")
    return total


def make_inner(kind: str, model: Net, extra: bool) -> torch.optim.Optimizer:
    """The inner optimizer: SGD with momentum or AdamW with weight decay; ``extra`` in a
    second group with its own learning rate once it has been added."""
    groups: list[dict[str, Any]] = [
        {"params": [p for name in BASE_LAYERS for p in getattr(model, name).parameters()]}
    ]
    if extra:
        groups.append(extra_group(model))
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)


def extra_group(model: Net) -> dict[str, Any]:
    return {"params": list(model.extra.parameters()), "lr": 0.02}


def group_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def documented(error: BaseException) -> bool:
    """Whether ``error`` is one the documentation promises: a ``gradsurgery.errors`` class,
    or a ValueError/RuntimeError/TypeError whose message (names and numbers aside) is
    quoted in docs/faq.md."""
    library = (errors.NonFiniteGradientError, errors.SolverError, errors.ParetoStationaryError)
    if isinstance(error, library):
        return True
    if not isinstance(error, ValueError | RuntimeError | TypeError):
        return False
    message = _generic(str(error))
    return any(len(quoted) >= 20 and message.startswith(quoted[:30]) for quoted in QUOTED)


def _generic(text: str) -> str:
    """Text with quoted names, lists, numbers and markup replaced by placeholders (the FAQ
    quotes a constraint's message for an objective's too)."""
    text = text.replace("objective", "constraint")
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)", "_", text)
    text = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "0", text)
    return re.sub(r"_(, _)+", "_", re.sub(r"[`*]", "", text))


QUOTED = [
    _generic(re.sub(r"^(RuntimeError|ValueError|TypeError): ", "", quoted))
    for quoted in re.findall(r"`([^`\n]+)`", FAQ)
]


@dataclass
class ScalerReference:
    """``GradScaler``'s scale, by its documented update rule."""

    scale: float = SCALE
    clean_steps: int = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= 0.5
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == GROWTH_INTERVAL:
            self.scale *= 2.0
            self.clean_steps = 0


@dataclass
class Plan:
    """What a step must do: raise ``error``, skip, or hand these gradients to the optimizer."""

    error: tuple[type[BaseException], ...] | None = None
    skip: bool = False
    found_inf: bool = False
    grads: dict[str, Tensor | None] = field(default_factory=dict)
    accumulated: dict[str, Tensor] = field(default_factory=dict)


class Reference:
    """The plain-torch twin of a wrapped model (see the module docstring).

    Args:
        model: a plain :class:`Net`, equal to the wrapped one.
        inner: ``"sgd"`` or ``"adamw"``.
        rows: number of constraints or objectives.
        extra: whether ``extra`` is in the optimizer already.
    """

    def __init__(self, model: Net, inner: str, rows: int, extra: bool) -> None:
        self.model = model
        self.inner = inner
        self.optimizer = make_inner(inner, model, extra)
        self.rows: list[dict[str, Tensor]] = [{} for _ in range(rows)]
        self.filled = [False] * rows
        self.accumulated: dict[str, Tensor] = {}

    @property
    def names(self) -> list[str]:
        """The names of the optimizer's parameters, in group order."""
        by_id = {id(p): name for name, p in self.model.named_parameters()}
        return [by_id[id(p)] for p in group_params(self.optimizer)]

    def param(self, name: str) -> Tensor:
        return dict(self.model.named_parameters())[name]

    def row_backward(self, row: int, value: Tensor) -> None:
        """Add the gradient of ``value`` to row ``row`` for the optimizer's parameters, and
        to ``.grad`` for the others, as ``loss.backward()`` does (docs/faq.md: a head
        outside the wrapper gets the gradient)."""
        inside = set(self.names)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        grads: tuple[Tensor | None, ...] = torch.autograd.grad(
            value, [p for _, p in named], allow_unused=True
        )
        for (name, p), grad in zip(named, grads, strict=True):
            if grad is None:
                continue
            if name in inside:
                previous = self.rows[row].get(name)
                self.rows[row][name] = grad if previous is None else previous + grad
            else:
                p.grad = grad if p.grad is None else p.grad + grad
        self.filled[row] = True

    def clear_rows(self) -> None:
        self.rows = [{} for _ in self.rows]
        self.filled = [False] * len(self.rows)

    def flat(self, row: int | None) -> np.ndarray:
        """``.grad`` (``row=None``; ``None`` counts as zero) or a row, flat in float64."""
        parts = []
        for name in self.names:
            p = self.param(name)
            value = p.grad if row is None else self.rows[row].get(name)
            parts.append(
                np.zeros(p.numel())
                if value is None
                else value.detach().double().reshape(-1).numpy().copy()
            )
        return np.concatenate(parts)

    def unflatten(self, flat: np.ndarray) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name in self.names:
            p = self.param(name)
            value = torch.from_numpy(flat[offset : offset + p.numel()].copy()).view(p.shape)
            out[name] = value.to(p.dtype)
            offset += p.numel()
        return out

    def received(self, name: str) -> bool:
        """Whether a parameter has a gradient this step: a ``.grad``, or one in some row."""
        return self.param(name).grad is not None or any(name in row for row in self.rows)

    def plan(
        self, direction: np.ndarray | None, error: tuple[type[BaseException], ...] | None
    ) -> Plan:
        """The step's gradients from the surgery's ``direction`` (``None``: skip)."""
        if error is not None:
            return Plan(error=error)
        if direction is None:
            return Plan(skip=True, found_inf=not self.finite(rows=True, task=True))
        values = self.unflatten(direction)
        grads = {name: values[name] if self.received(name) else None for name in self.names}
        return Plan(grads=grads)

    def finite(self, rows: bool, task: bool) -> bool:
        arrays = [self.flat(k) for k in range(len(self.rows))] if rows else []
        if task:
            arrays.append(self.flat(None))
        return all(np.isfinite(a).all() for a in arrays)

    def refusal(self, scaler: bool, stray: bool) -> tuple[type[BaseException], ...] | None:
        """The errors a step may raise: a missing row or a stray backward pass (a
        RuntimeError), a non-finite gradient without a scaler; ``None`` if it must not."""
        errors_: list[type[BaseException]] = []
        if not all(self.filled) or stray:
            errors_.append(RuntimeError)
        if not scaler and not self.finite(rows=True, task=True):
            errors_.append(errors.NonFiniteGradientError)
        return tuple(errors_) or None

    def gem_plan(self, margin: float, mode: str, scaler: bool) -> Plan:
        """GEM / A-GEM on ``.grad`` and the constraint rows (Lopez-Paz & Ranzato, 2017)."""
        refusal = self.refusal(scaler, stray=False)
        if refusal is not None or not self.finite(rows=True, task=True):
            return self.plan(None, refusal)
        g = self.flat(None)
        J = np.stack([self.flat(k) for k in range(len(self.rows))])
        project = reference.project if mode == "gem" else reference.project_agem
        return self.plan(project(g, J, margin), None)

    def multi_plan(self, method: str, scaler: bool, stray: bool) -> Plan:
        """MGDA (Sener & Koltun, 2018) or LF-MLF (Mao et al., 2022) on the objective rows."""
        refusal = self.refusal(scaler, stray)
        if refusal is not None or not self.finite(rows=True, task=True):
            return self.plan(None, refusal)
        G = np.stack([self.flat(k) for k in range(len(self.rows))])
        K = G @ G.T
        if method == "mgda":
            return self.plan(G.T @ reference.min_norm(K), None)
        hull = G.T @ reference.min_norm(K)
        largest = np.sqrt(np.diag(K).max())
        if np.linalg.norm(hull) <= STATIONARITY_TOL * largest:
            return self.plan(None, None)
        accumulated = np.concatenate(
            [
                self.accumulated.get(
                    name, torch.zeros(self.param(name).numel(), dtype=torch.float64)
                )
                .reshape(-1)
                .numpy()
                for name in self.names
            ]
        )
        d = G.T @ reference.lfmlf(K, G @ accumulated)
        plan = self.plan(d, None)
        totals = self.unflatten(accumulated + d)
        plan.accumulated = {name: totals[name].double() for name in self.names}
        return plan

    def apply(self, plan: Plan) -> None:
        """Hand ``plan``'s gradients to ``.grad`` (and keep its LF-MLF ``ḡ``)."""
        for name, grad in plan.grads.items():
            self.param(name).grad = grad
        self.accumulated.update(plan.accumulated)

    def step(self) -> None:
        self.optimizer.step()

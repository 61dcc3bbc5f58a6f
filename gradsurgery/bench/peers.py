"""The same surgery as other code does it, on the same rows: the benchmark's peers.

* ``published GEM`` (for ``gem``): the approach of the original GEM code (Lopez-Paz &
  Ranzato, 2017, also used by Liu et al. 2021), re-implemented: each gradient copied
  parameter by parameter into a column of a ``(p, t + 1)`` matrix, the memories copied to
  the host in float64, Gram and projection in NumPy with quadprog (``eps = 1e-3`` ridge),
  the result copied back parameter by parameter. Needs ``quadprog``.
* ``TorchJD DualProj`` (``gem``), ``TorchJD PCGrad`` (``pcgrad``), ``TorchJD MGDA``
  (``mgda``): TorchJD's aggregators on the stacked rows, the result written into ``.grad``
  (``DualProj`` with preference ``e₀`` projects ``g`` onto the rows' dual cone, which is
  GEM's projection). Needs ``torchjd``.
* ``LibMTL PCGrad`` and ``S&K MGDA``: see :mod:`gradsurgery.bench.libmtl`.

A peer that is not installed is reported as skipped, with the command that installs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradsurgery import gram
from gradsurgery.bench.libmtl import mgda_frank_wolfe, pcgrad_loop
from gradsurgery.bench.methods import SEED, Case
from gradsurgery.functional.pcgrad import conflict_orders, pcgrad_coefficients

__all__ = ["PEERS", "peer_step"]

PEERS: dict[str, tuple[str, ...]] = {
    "gem": ("published GEM", "TorchJD DualProj"),
    "pcgrad": ("LibMTL PCGrad", "TorchJD PCGrad"),
    "mgda": ("S&K MGDA", "TorchJD MGDA"),
}
INSTALL = "pip install 'gradsurgery[bench]'"
Step = Callable[[], Any]


class PeerMissingError(RuntimeError):
    """The peer's package is not installed."""


def _torchjd() -> Any:
    try:
        from torchjd import aggregation
    except ImportError as error:
        raise PeerMissingError(f"torchjd is not installed ({INSTALL})") from error
    return aggregation


def _views(row: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for q in params:
        out.append(row[offset : offset + q.numel()].view_as(q))
        offset += q.numel()
    return out


def _published_gem(case: Case) -> Step:
    try:
        import quadprog
    except ImportError as error:
        raise PeerMissingError(f"quadprog is not installed ({INSTALL})") from error
    params = case.opt.bank.params
    block = case.opt.bank.blocks[0]
    t = block.shape[0] - 1
    case.setup()
    sources = [_views(row, params) for row in (block[0].clone(), *block[1:])]
    matrix = torch.zeros(block.shape[1], t + 1, device=block.device)

    def store(grads: list[Tensor], column: int) -> None:
        offset = 0
        for grad in grads:
            matrix[offset : offset + grad.numel(), column].copy_(grad.reshape(-1))
            offset += grad.numel()

    def step() -> None:
        for k in range(t):
            store(sources[k + 1], k)
        store(sources[0], t)
        memories, gradient = matrix[:, :t], matrix[:, t]
        if bool(((gradient @ memories) < 0).any()):
            memories_np = memories.cpu().t().double().numpy()
            gradient_np = gradient.cpu().double().numpy()
            P = memories_np @ memories_np.T
            P = 0.5 * (P + P.T) + np.eye(t) * 1e-3
            q = -(memories_np @ gradient_np)
            v = quadprog.solve_qp(P, q, np.eye(t), np.zeros(t))[0]
            x = torch.as_tensor(v @ memories_np + gradient_np, dtype=torch.float32)
            gradient.copy_(x.to(gradient.device))
            offset = 0
            for p in params:  # the original writes each parameter's .grad back
                assert p.grad is not None
                p.grad.copy_(gradient[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    return step


def _torchjd_pcgrad_reference(rows: Tensor) -> Tensor:
    """The library's PCGrad direction for the orders TorchJD draws after ``manual_seed``."""
    t = rows.shape[0]
    torch.manual_seed(SEED)
    orders = torch.stack(
        [perm[perm != i] for i, perm in enumerate(torch.randperm(t) for _ in range(t))]
    )
    weights = pcgrad_coefficients(gram.gram(rows), orders).sum(dim=0).to(rows.device)
    out = torch.empty_like(rows[0])
    return gram.combine_(out, rows, weights, accumulate=False)


def peer_step(name: str, case: Case) -> tuple[Step, Callable[[Tensor], Tensor]]:
    """``(step, reference)``: one call of the peer and the direction it should give.

    ``step`` writes the peer's result into ``.grad`` (call ``case.setup`` before each);
    ``reference`` maps the case's own direction to the one the peer is compared with.

    Raises:
        PeerMissingError: the peer's package is not installed.
        ValueError: an unknown peer.
    """
    block = case.opt.bank.blocks[0]
    out = block[0]
    same: Callable[[Tensor], Tensor] = lambda direction: direction  # noqa: E731
    if name == "published GEM":
        return _published_gem(case), same
    if name == "LibMTL PCGrad":
        orders = conflict_orders(case.rows.shape[0], torch.Generator().manual_seed(SEED))
        return lambda: pcgrad_loop(case.rows, orders, out), same
    if name == "S&K MGDA":
        return lambda: mgda_frank_wolfe(case.rows, out), same
    if name.startswith("TorchJD "):
        aggregation = _torchjd()
        if name == "TorchJD DualProj":
            t = block.shape[0] - 1
            aggregator = aggregation.DualProj(pref_vector=torch.eye(t + 1, device=block.device)[0])

            def dualproj() -> None:
                out.copy_(aggregator(block))

            return dualproj, same
        aggregator = getattr(aggregation, name.split()[1])()

        def aggregate() -> None:
            torch.manual_seed(SEED)  # TorchJD's PCGrad draws its orders from the global RNG
            out.copy_(aggregator(case.rows))

        if name == "TorchJD PCGrad":
            return aggregate, lambda direction: _torchjd_pcgrad_reference(case.rows)
        return aggregate, same
    raise ValueError(f"unknown peer {name!r}; the peers are {sorted(sum(PEERS.values(), ()))}")

"""PCGrad and MGDA as the widely used public implementations do them (benchmark peers).

Re-implemented here on a ``(T, p)`` matrix of stacked gradients, keeping the structure that
sets their cost (host reads, passes over the gradients, temporaries); what happens before
(copying each backward's ``.grad`` into the matrix) and after (copying the result back
parameter by parameter) is left out, so the comparison is conservative.

* :func:`pcgrad_loop`: LibMTL's ``PCGrad.backward`` (Lin & Zhang, LibMTL, 2023): clone the
  matrix, then for each objective ``i`` and each ``j`` in a shuffled list of *all*
  objectives (``j = i`` included) one dot product, a host read to test its sign, and on a
  conflict an in-place update of row ``i`` that recomputes ``‖g_j‖²``, plus a second host
  read for LibMTL's ``batch_weight`` bookkeeping; then ``d`` = the sum of the rows.
* :func:`mgda_frank_wolfe`: Sener & Koltun's public ``MinNormSolver.find_min_norm_element_FW``
  (2018) on the Gram matrix (one matrix product on the device, as LibMTL computes it, then
  copied to the host): the best pair by the two-vector rule (which clamps its step to
  0.999 or 0.001 instead of 1 or 0), then Frank–Wolfe steps (at most ``MAX_ITER = 250``,
  stopping when the weights change by less than ``STOP_CRIT = 1e-5`` in L1 norm); then
  ``d = Σ_t w_t g_t`` as LibMTL forms it, one scaled temporary per objective.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["mgda_frank_wolfe", "min_norm_frank_wolfe", "pcgrad_loop"]

MAX_ITER = 250
STOP_CRIT = 1e-5


def pcgrad_loop(grads: Tensor, orders: Tensor, out: Tensor) -> None:
    """Write LibMTL's PCGrad direction (``"sum"``) for ``grads`` into ``out``.

    ``orders[i]`` lists the other objectives in the order row ``i`` is projected against
    them (LibMTL draws it with ``random.shuffle``; passing it in lets the result be
    compared with another implementation using the same orders).
    """
    t = grads.shape[0]
    batch_weight = np.ones(t)
    pc_grads = grads.clone()
    for i in range(t):
        for j in [i, *orders[i].tolist()]:
            g_ij = torch.dot(pc_grads[i], grads[j])
            if g_ij < 0:
                pc_grads[i] -= g_ij * grads[j] / (grads[j].norm().pow(2))
                batch_weight[j] -= (g_ij / (grads[j].norm().pow(2))).item()
    out.copy_(pc_grads.sum(0))


def _min_norm_element_from2(v1v1: float, v1v2: float, v2v2: float) -> tuple[float, float]:
    """``min_γ ‖γ v1 + (1 − γ) v2‖²``: ``(γ, cost)``, clamped to 0.999 / 0.001 as published."""
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def _min_norm_2d(gram: np.ndarray[Any, Any]) -> tuple[tuple[int, int], float]:
    dmin, best = 1e8, None
    for i in range(len(gram)):
        for j in range(i + 1, len(gram)):
            c, d = _min_norm_element_from2(gram[i, i], gram[i, j], gram[j, j])
            if d < dmin:
                dmin, best = d, ((i, j), c)
    if best is None:  # the published code fails here too (its `sol` is never assigned)
        raise ValueError("every pair's min-norm cost is ≥ 1e8: scale the gradients down")
    return best


def min_norm_frank_wolfe(gram: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], int]:
    """Sener & Koltun's Frank–Wolfe min-norm weights from a Gram matrix; and its iterations."""
    n = len(gram)
    (i, j), gamma = _min_norm_2d(gram)
    sol_vec = np.zeros(n)
    sol_vec[i], sol_vec[j] = gamma, 1 - gamma
    if n < 3:
        return sol_vec, 0
    for iteration in range(MAX_ITER):
        t_iter = int(np.argmin(gram @ sol_vec))
        v1v1 = sol_vec @ gram @ sol_vec
        v1v2 = sol_vec @ gram[:, t_iter]
        v2v2 = gram[t_iter, t_iter]
        nc, _ = _min_norm_element_from2(v1v1, v1v2, v2v2)
        new_sol_vec = nc * sol_vec
        new_sol_vec[t_iter] += 1 - nc
        if np.sum(np.abs(new_sol_vec - sol_vec)) < STOP_CRIT:
            return sol_vec, iteration + 1
        sol_vec = new_sol_vec
    return sol_vec, MAX_ITER


def mgda_frank_wolfe(grads: Tensor, out: Tensor) -> int:
    """Write MGDA's direction by Sener & Koltun's Frank–Wolfe into ``out``; return iterations."""
    gram = grads.mm(grads.t()).double().cpu().numpy()
    sol, iterations = min_norm_frank_wolfe(gram)
    new_grads = float(sol[0]) * grads[0]
    for i in range(1, len(sol)):
        new_grads = new_grads + float(sol[i]) * grads[i]
    out.copy_(new_grads)
    return iterations

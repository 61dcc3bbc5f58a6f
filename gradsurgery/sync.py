"""Where reading a value back to the host is free, and where it stalls the device.

On the CPU a tensor's value is already on the host, so a wrapper may branch on it (skip a
projection nobody needs, skip a solve). On an accelerator the same read waits for every
queued kernel: the code paths for such devices compute unconditionally instead, with
``torch.where``, and read nothing back unless the user asked for validation.
"""

from __future__ import annotations

import torch

__all__ = ["SYNCING_OPS", "host_reads_are_free"]

SYNCING_OPS = frozenset(
    {
        "aten._local_scalar_dense.default",
        "aten.is_nonzero.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten._linalg_check_errors.default",
        "aten.equal.default",
        "aten.unique_dim.default",
        "aten._unique2.default",
    }
)
"""The aten operations that make a CUDA device wait for the host: reading a value,
data-dependent shapes, error-checked linear algebra (used to count or forbid them on the
CPU, where nothing waits)."""


def host_reads_are_free(device: torch.device) -> bool:
    """Whether branching on a tensor's value on ``device`` costs no synchronisation."""
    return device.type == "cpu"

"""Where reading a value back to the host is free, and where it stalls the device.

On the CPU a tensor's value is already on the host, so a wrapper may branch on it (skip a
projection nobody needs, skip a solve). On an accelerator the same read waits for every
queued kernel: the code paths for such devices compute unconditionally instead, with
``torch.where``, and read nothing back unless the user asked for validation.
"""

from __future__ import annotations

import torch

__all__ = ["host_reads_are_free"]


def host_reads_are_free(device: torch.device) -> bool:
    """Whether branching on a tensor's value on ``device`` costs no synchronisation."""
    return device.type == "cpu"

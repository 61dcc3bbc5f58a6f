"""Catch, on the CPU, the calls that would make a CUDA device wait for the host.

``no_host_sync()`` fails on the aten operations that synchronise on CUDA (reading a scalar,
``nonzero``, boolean-mask indexing, error-checked linear algebra) and on
``Tensor.tolist``/``numpy``/``cpu``, which read memory without dispatching on the CPU. It also makes
``gradsurgery.sync.host_reads_are_free`` answer False, so the code takes the path it takes
on an accelerator. On a real GPU the CUDA tests use ``torch.cuda.set_sync_debug_mode``.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradsurgery.sync
from gradsurgery.sync import SYNCING_OPS


class HostSyncError(AssertionError):
    pass


class _Guard(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        if name in SYNCING_OPS:
            raise HostSyncError(f"{name} synchronises with the host")
        if name == "aten.index.Tensor" and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        ):
            raise HostSyncError("boolean-mask indexing synchronises with the host")
        return func(*args, **kwargs)


@contextmanager
def no_host_sync() -> Iterator[None]:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise HostSyncError("reading tensor values on the host synchronises")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradsurgery.sync, "host_reads_are_free", lambda device: False)
        patch.setattr(torch.Tensor, "tolist", forbidden)
        patch.setattr(torch.Tensor, "numpy", forbidden)
        patch.setattr(torch.Tensor, "cpu", forbidden)
        with _Guard():
            yield

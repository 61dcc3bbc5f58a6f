"""Timing, memory and host-synchronisation measurements of one callable on one device.

CPU times are wall-clock (``time.perf_counter``) or, with :func:`use_clock`, the calling
thread's CPU time; CUDA times are measured with CUDA
events recorded around the call, after warm-up runs, so they count device time and no
launch latency of the host beyond what the call itself waits for.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradsurgery.sync
from gradsurgery.sync import SYNCING_OPS

__all__ = [
    "CLOCKS",
    "count_host_syncs",
    "interleaved",
    "measure",
    "samples",
    "summary",
    "transient_bytes",
    "use_clock",
]

Step = Callable[[], Any]


CLOCKS = ("wall", "thread")
_clock = {"now": time.perf_counter}


def use_clock(name: str) -> None:
    """Time CPU calls by the wall clock (``"wall"``) or by this thread's CPU time.

    ``"thread"`` (``time.thread_time``) leaves out the time the thread waits for a core,
    which on a shared machine can be most of the wall time; it is only meaningful with one
    torch thread (the work of other threads is not counted).

    Raises:
        ValueError: an unknown clock, or ``"thread"`` with more than one torch thread.
    """
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {name!r}")
    if name == "thread" and torch.get_num_threads() != 1:
        raise ValueError("the thread clock needs one torch thread (--threads 1)")
    _clock["now"] = time.thread_time if name == "thread" else time.perf_counter


def measure(fn: Step, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device`` (CUDA: between two events)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end)) / 1e3
    now = _clock["now"]
    begin = now()
    fn()
    return now() - begin


def samples(
    fn: Step, device: torch.device, repeat: int, warmup: int, setup: Step = lambda: None
) -> list[float]:
    """``repeat`` timed calls of ``fn`` after ``warmup`` untimed ones; ``setup`` before each."""
    out = []
    for i in range(warmup + repeat):
        setup()
        seconds = measure(fn, device)
        if i >= warmup:
            out.append(seconds)
    return out


def interleaved(
    fn: Step,
    row: torch.Tensor,
    device: torch.device,
    repeat: int,
    warmup: int,
    setup: Step = lambda: None,
) -> tuple[list[float], list[float]]:
    """Samples of ``fn`` and of the time the memory takes to move one value, alternated.

    With each sample of ``fn``, two streaming kernels are timed on ``row``: a copy
    (``scratch ← row``: two values moved per element) and an in-place addition
    (``scratch += row``: three). The faster per value is the sample's rate: on a CPU a
    copy's store first reads the line it overwrites, which an in-place update does not, so
    the copy alone understates the bandwidth. Timed next to ``fn`` sample by sample, the rate
    follows the machine's drift as ``fn``'s times do. The scratch is written before it is
    read (an unwritten tensor reads the shared zero page and copies fake-fast).
    """
    scratch = torch.empty_like(row)
    timed, per_value = [], []
    for i in range(warmup + repeat):
        setup()
        seconds = measure(fn, device)
        copy = measure(lambda: scratch.copy_(row), device)
        add = measure(lambda: scratch.add_(row), device)
        if i >= warmup:
            timed.append(seconds)
            per_value.append(min(copy / 2, add / 3) / row.numel())
    return timed, per_value


def summary(times: list[float]) -> dict[str, Any]:
    """Median, quartiles, extremes and every sample, in seconds."""
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return {
        "median_s": statistics.median(times),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": min(times),
        "max_s": max(times),
        "samples": times,
    }


def transient_bytes(fn: Step, device: torch.device) -> int:
    """Most memory ``fn`` allocates on top of what exists (CUDA: peak; CPU: largest block)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    return max((int(e.cpu_memory_usage) for e in prof.events()), default=0)


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send what native code writes to the standard error to /dev/null meanwhile.

    The profiler's C++ side prints ``USDT: ... profiler_start`` lines and, on a machine
    without a GPU, ``gpuGetDeviceCount failed`` errors: noise in the middle of the
    benchmark's progress bar, about nothing the user can act on.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if name in SYNCING_OPS or (
            name == "aten.index.Tensor"
            and any(i is not None and i.dtype == torch.bool for i in args[1])
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _emulated_accelerator(counter: _Counter) -> Iterator[None]:
    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        def read(*args: Any, **kwargs: Any) -> Any:
            counter.count += 1
            return original(*args, **kwargs)

        return read

    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}
    free = gradsurgery.sync.host_reads_are_free
    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, counted(original))
        gradsurgery.sync.host_reads_are_free = lambda device: False
        with counter:
            yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        gradsurgery.sync.host_reads_are_free = free


def count_host_syncs(fn: Step, device: torch.device) -> tuple[int, str]:
    """How many times one call of ``fn`` waits for the device; and how that was counted.

    On CUDA: the warnings of ``torch.cuda.set_sync_debug_mode("warn")``. On the CPU, where
    nothing waits: the calls that would synchronise on CUDA (the aten operations above and
    ``tolist``/``numpy``/``cpu``), with the library taking its accelerator code paths.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        return len(syncs), "cuda sync debug mode"
    counter = _Counter()
    with _emulated_accelerator(counter):
        fn()
    return counter.count, "emulated on the CPU (operations that synchronise on CUDA)"

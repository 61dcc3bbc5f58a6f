"""One benchmark configuration (size, dtype, ``t``): every method, its parts, its peers."""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradsurgery.bench import timing
from gradsurgery.bench.methods import MULTI, SEED, Case, build, phased_steps
from gradsurgery.bench.peers import PEERS, PeerMissingError, peer_step
from gradsurgery.bench.workload import DTYPES

__all__ = ["Settings", "memory_limit", "run_config"]


@dataclass(frozen=True)
class Settings:
    """How every configuration of one run is measured."""

    device: torch.device
    repeat: int
    warmup: int
    validate: bool
    peers: bool
    max_bytes: int


def memory_limit(device: torch.device) -> int:
    """3/4 of the memory available now on ``device`` (CPU: ``MemAvailable``), in bytes."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) * 3 // 4
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available * 3 // 4


def _footprint(method: str, p: int, t: int, size: int) -> int:
    """Most bytes a method's measurement holds: its rows, parameters, clones, scratch."""
    rows = t + 2 if method == "lfmlf" else t + 1
    extra = 3 * p * 4 if method == "gradvac-param" else 0  # segment_gram's temporaries
    return (rows + 4) * p * size + extra


def _relative(x: Tensor, reference: Tensor) -> float:
    x, reference = x.double(), reference.double()
    return float((x - reference).norm() / reference.norm())


def _measure_case(case: Case, settings: Settings) -> dict[str, Any]:
    device, repeat, warmup = settings.device, settings.repeat, settings.warmup
    row = case.rows[0]
    total, per_value = timing.interleaved(case.surgery, row, device, repeat, warmup, case.setup)
    entry: dict[str, Any] = {"total": timing.summary(total)}
    for part, fn in case.parts.items():
        entry[part] = timing.summary(timing.samples(fn, device, repeat, warmup, case.setup))
    values = case.floor_values * row.numel()
    entry["floor_values_per_parameter"] = case.floor_values
    entry["floor_s"] = values * statistics.median(per_value)
    entry["floor_samples"] = [values * seconds for seconds in per_value]
    entry["ratio_to_floor"] = entry["total"]["median_s"] / entry["floor_s"]
    entry["bandwidth_GBps"] = row.element_size() / statistics.median(per_value) / 1e9
    entry["extra_memory_bytes"] = case.extra_bytes
    case.setup()
    entry["transient_bytes"] = timing.transient_bytes(case.surgery, device)
    validate = case.opt.validate
    case.opt.validate = False  # the configuration that promises no host read
    case.setup()
    try:
        entry["host_syncs"], entry["host_syncs_counted"] = timing.count_host_syncs(
            case.surgery, device
        )
    finally:
        case.opt.validate = validate
    return entry


def _measure_peers(
    method: str, case: Case, p: int, t: int, settings: Settings
) -> dict[str, dict[str, Any]]:
    generator = getattr(case.opt, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(SEED)  # the orders the peers replay
    direction = case.direction()
    out: dict[str, dict[str, Any]] = {}
    for name in PEERS.get(method, ()):
        if name == "published GEM" and 2 * p * (t + 1) * 8 + p * 4 * (t + 1) > settings.max_bytes:
            out[name] = {"of": method, "skipped": "its matrix and float64 copies need more memory"}
            continue
        try:
            step, reference = peer_step(name, case)
        except PeerMissingError as error:
            out[name] = {"of": method, "skipped": str(error)}
            continue
        try:
            times = timing.samples(
                step, settings.device, settings.repeat, settings.warmup, case.setup
            )
        except (RuntimeError, TypeError, ValueError) as error:  # e.g. a dtype it cannot take
            out[name] = {"of": method, "skipped": f"failed: {type(error).__name__}: {error}"}
            continue
        case.setup()
        step()
        result = case.opt.bank.blocks[0][0]
        out[name] = {
            "of": method,
            "total": timing.summary(times),
            "relative_difference": _relative(result, reference(direction)),
        }
    return out


def _phased(p: int, dtype: torch.dtype, settings: Settings) -> dict[str, Any]:
    phased, inner, release = phased_steps(p, settings.device, dtype)
    args = (settings.device, settings.repeat, settings.warmup)
    entry: dict[str, Any] = {
        "total": timing.summary(timing.samples(phased, *args)),
        "inner_step": timing.summary(timing.samples(inner, *args)),
    }
    entry["bookkeeping_s"] = entry["total"]["median_s"] - entry["inner_step"]["median_s"]
    entry["host_syncs"], entry["host_syncs_counted"] = timing.count_host_syncs(
        phased, settings.device
    )
    release()
    return entry


def run_config(
    size: str,
    p: int,
    dtype: str,
    t: int,
    methods: list[str],
    settings: Settings,
    tick: Callable[[str], None],
) -> dict[str, Any]:
    """Measure every method at one ``(size, dtype, t)``; ``tick`` after each method."""
    record: dict[str, Any] = {"size": size, "p": p, "dtype": dtype, "t": t}
    record["methods"], record["peers"] = {}, {}
    torch_dtype = DTYPES[dtype]
    for method in methods:
        tick(f"{method} {size} {dtype} t={t}")
        if method == "phased":
            record["methods"][method] = _phased(p, torch_dtype, settings)
            continue
        if method in MULTI and t < 2:
            record["methods"][method] = {"skipped": "combines T ≥ 2 objectives"}
            continue
        needed = _footprint(method, p, t, torch_dtype.itemsize)
        if needed > settings.max_bytes:
            record["methods"][method] = {
                "skipped": f"needs ~{needed / 1e9:.1f} GB, more than the "
                f"{settings.max_bytes / 1e9:.1f} GB allowed (--max-bytes)"
            }
            continue
        case = build(method, p, t, settings.device, torch_dtype, settings.validate)
        record["n_tensors"] = len(case.opt.bank.params)
        record["methods"][method] = _measure_case(case, settings)
        if settings.peers:
            record["peers"].update(_measure_peers(method, case, p, t, settings))
        case.release()
        del case
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    return record

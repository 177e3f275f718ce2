"""Measuring helpers shared by the benchmarks: interleaved medians, peak memory, the machine.

Machines are noisy, so configurations are never timed one after the other: every round
runs each of them once, in turn, and a configuration's time is the median of its rounds
after the warm-up ones. A slow phase of the machine then hits every configuration alike.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from condlora.core.reporting import markdown_table, provenance

REPO = Path(__file__).resolve().parents[1]
CLOCKS = ("wall", "cpu")  # cpu: this process's CPU time (steadier on a shared machine)


def sync(device: str) -> None:
    """Wait for queued GPU work, so times are real."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: str = "cpu",
    clock: str = "wall",
) -> dict[str, float]:
    """Median seconds of each fn over `repeats` rounds, after `warmup` rounds; each round
    runs every fn once, in turn."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = now()
            fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(now() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes held by distinct tensors."""
    unique = {id(t): t for t in tensors if torch.is_tensor(t)}
    return sum(t.numel() * t.element_size() for t in unique.values())


def peak_step_bytes(step: Callable[[], object], device: str) -> int:
    """Peak memory allocated while `step` runs, above what was allocated before it.

    GPU: the allocator's peak. CPU: the profiler's record of every allocation and free
    (its raw "[memory]" events), summed in time order.
    """
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # + allocation, - free
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def machine(device: str) -> dict:
    """Where the figures come from: commit, date, CPU, cores, threads, torch, device."""
    info = provenance() | {"device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_json(name: str, info: dict, results: dict) -> None:
    """The one machine-readable line every benchmark ends with."""
    print(json.dumps({"benchmark": name, **info, "results": results}, sort_keys=True))


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table."""
    print("\n".join(markdown_table(header, rows)))

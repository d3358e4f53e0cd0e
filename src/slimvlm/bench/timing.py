"""Wall-clock timing: CUDA events after warm-up on a GPU, perf_counter on a CPU; medians of repeats."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU), before and after a host-clock reading."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one fn() call: CUDA events on a GPU (the device idle at the start), perf_counter on a CPU."""
    if device.type != "cuda":
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1000
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median milliseconds of fn() over `repeats` runs after `warmup` runs."""
    return interleaved_medians_ms({None: fn}, device, warmup, repeats)[None]


def interleaved_medians_ms(fns: dict, device: torch.device, warmup: int = 2, repeats: int = 5) -> dict:
    """Per key, the median milliseconds of its fn() over `repeats` rounds after `warmup` rounds, each round calling
    every fn once in turn: a drift of the machine (clocks, other tenants) over the run falls on every fn alike,
    instead of on whichever ran last."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key].append(elapsed_ms(fn, device))
    return {key: statistics.median(values) for key, values in times.items()}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak GPU memory allocated during fn(); None on a CPU, where torch keeps no such counter."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)

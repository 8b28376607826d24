"""Timing helpers: warm-up, repeat, median (the machine is shared and noisy)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1,
                        progress: Callable[[], None] | None = None) -> dict[str, float]:
    """Median wall time (s) of each function, timed round-robin.

    Round ``r`` times every function once, so slow phases of a shared machine hit all of them
    alike and their ratios stay meaningful.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress()
    return {name: statistics.median(ts) for name, ts in times.items()}


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a wait for the device (CUDA runs asynchronously; the CPU needs no wait)."""
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)

    return run


def first_call_s(fn: Callable[[], object]) -> float:
    """Wall time (s) of one call of ``fn``: for a compiled function's first call, its compilation (plus one run)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed blocks instead of returning them to the OS.

    PyTorch on CPU allocates its large activations with malloc. By default glibc serves blocks
    above a threshold with mmap and unmaps them on free, so every iteration page-faults its big
    buffers afresh; how much depends on what ran just before, which makes interleaved timings
    of different modules disagree. jemalloc/tcmalloc avoid this; here we raise glibc's mmap and
    trim thresholds (process-wide, for every implementation alike). Returns False where glibc's
    ``mallopt`` is unavailable.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB. ``VmHWM`` belongs to the process image, so a
    child started by fork + exec (multiprocessing's spawn) does not inherit its parent's peak, which
    ``getrusage``'s ``ru_maxrss`` does."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

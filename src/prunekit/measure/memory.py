"""TODO"""
from __future__ import annotations

import gc
import os
import sys
import threading
import tracemalloc
from typing import Any, Callable, Dict, Optional, Tuple

import torch

# ------------------------------------------------------------------------------------------------ memory

def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss; Linux reports KiB, macOS bytes)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _current_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def measure_peak_memory(fn: Callable, *args, interval: float = 0.005, **kwargs) -> Tuple[Any, Dict[str, int]]:
    """Run fn(*args, **kwargs) and report how far memory rose above where it started.

    CPU: a sampling thread polls the resident set size (/proc/self/statm) every `interval` seconds; torch's
    CPU allocations bypass tracemalloc, so RSS is the honest measure. CUDA: torch.cuda.max_memory_allocated.
    Returns (fn's result, {"rss_start", "rss_peak", "rss_delta", "cuda_peak"}) in bytes. For clean numbers
    run each measured mode in a fresh process: glibc keeps freed heap pages, so a second run in the same
    process can reuse memory and look smaller.
    """
    start = _current_rss_bytes()
    peak = [start or 0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            cur = _current_rss_bytes()
            if cur is not None and cur > peak[0]:
                peak[0] = cur
            stop.wait(interval)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_start = torch.cuda.memory_allocated()
    thread = threading.Thread(target=sample, daemon=True)
    if start is not None:
        thread.start()
    try:
        result = fn(*args, **kwargs)
    finally:
        stop.set()
        if start is not None:
            thread.join()
    if start is None:                                               # no /proc: fall back to ru_maxrss
        start, peak[0] = 0, peak_rss_bytes()
    report = {"rss_start": int(start), "rss_peak": int(peak[0]), "rss_delta": int(peak[0] - start),
              "cuda_peak": int(torch.cuda.max_memory_allocated() - cuda_start) if cuda else 0}
    return result, report


# ----------------------------------------------------------------------------------------------- memory
def _torch_cpu_peak(prof) -> Optional[int]:
    """Peak live bytes from the profiler's raw allocation (+) / free (-) events in time order.

    Uses `prof.profiler.kineto_results` (the raw event list): the public `events()` folds allocations into the
    ops that made them and loses their timing. Returns None if this torch version lacks that attribute."""
    try:
        raw = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    raw.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in raw:
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue  # CUDA allocations, if any, are measured by the CUDA branch of peak_memory
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def peak_memory(fn: Callable[[], Any], device: str = "cpu") -> Dict[str, Any]:
    """Peak memory used while running `fn()` (see the module docstring for exactly what is counted).

    Returns {"torch_peak_bytes", "python_peak_bytes", "device", "method"}; `fn`'s return value is discarded.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"torch_peak_bytes": int(torch.cuda.max_memory_allocated() - base), "python_peak_bytes": None,
                "device": device, "method": "torch.cuda.max_memory_allocated minus memory allocated before"}
    from torch.profiler import ProfilerActivity, profile
    tracemalloc.start()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            pass  # warm the profiler so its own one-off allocations are not charged to fn
        tracemalloc.reset_peak()
        base_py = tracemalloc.get_traced_memory()[0]
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        py_peak = tracemalloc.get_traced_memory()[1] - base_py
    finally:
        tracemalloc.stop()
    return {"torch_peak_bytes": _torch_cpu_peak(prof), "python_peak_bytes": int(py_peak), "device": "cpu",
            "method": "torch profiler allocation events (tensor storage) + tracemalloc (Python heap)"}

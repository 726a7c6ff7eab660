"""Honest measurements: latency, memory, parameters, size on disk, LM prefill/decode speed, environment.

Rules followed here, because pruning speedups are easy to overstate:
  * Models being compared are timed interleaved in one process (rep 1 of every model, then rep 2, ...; the
    order rotates each rep), so drift in clock speed or background load hits all of them alike.
  * Thread count is pinned (`torch.set_num_threads`) and restored; warm-up calls are discarded.
  * Medians and inter-quartile ranges are reported, not means (a few preempted calls skew a mean).
  * Every result carries `environment_info()` so a number is never shown without the machine it came from.

Memory (`peak_memory`): on CPU, the peak of live bytes held by torch's CPU allocator during the call,
reconstructed from the profiler's allocation/free event stream (exact for tensor storage, including
temporaries freed inside ops), plus the Python heap peak from `tracemalloc` (numpy arrays included). Not
counted: memory of other native libraries (oneDNN scratch, ONNX Runtime arenas) and memory held before the
call. Process RSS is not used: it includes allocator caching and never goes down, so it measures the history
of the process rather than the function. On CUDA the peak is `torch.cuda.max_memory_allocated`.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Dict, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from prunekit.batch import call_model, model_device, repeat_to_batch
from prunekit.errors import ConfigError
from prunekit.measure.env import environment_info


def sync_device(device_type: str):
    if device_type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def pinned_threads(threads: int, pin_affinity: bool = False):
    """Run a block with `threads` intra-op torch threads (and, if asked, the process bound to that many
    CPUs); restore both afterwards so measuring does not change the caller's settings."""
    old_threads = torch.get_num_threads()
    old_aff = None
    torch.set_num_threads(threads)
    if pin_affinity and hasattr(os, "sched_setaffinity"):
        old_aff = os.sched_getaffinity(0)
        os.sched_setaffinity(0, sorted(old_aff)[:threads])
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_aff is not None:
            os.sched_setaffinity(0, old_aff)


# ----------------------------------------------------------------------------------------------- latency
class LatencyResult(dict):
    """{"rows": [{model, batch_size, median_ms, iqr_ms, p25_ms, p75_ms, reps, items_per_s}], "env": {...},
    "settings": {...}} with helpers; a dict so it serializes to JSON as is."""

    def get_row(self, model: str, batch_size: int) -> Dict[str, Any]:
        for r in self["rows"]:
            if r["model"] == model and r["batch_size"] == batch_size:
                return r
        raise KeyError(f"no latency row for model={model!r} batch_size={batch_size}")

    def speedup(self, baseline: str, model: str, batch_size: int) -> float:
        """Median latency of `baseline` / median latency of `model` at one batch size."""
        return self.get_row(baseline, batch_size)["median_ms"] / self.get_row(model, batch_size)["median_ms"]

    def to_markdown(self) -> str:
        names = list(dict.fromkeys(r["model"] for r in self["rows"]))
        base = names[0]
        lines = ["| model | batch | median ms | IQR ms | items/s | speedup vs " + base + " |",
                 "|---|---:|---:|---:|---:|---:|"]
        for r in self["rows"]:
            sp = self.speedup(base, r["model"], r["batch_size"])
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | "
                         f"{r['items_per_s']:.1f} | {sp:.2f}x |")
        e = self["env"]
        lines.append(f"\n_{e['cpu_model']}, {self['settings']['threads']} thread(s), torch {e['torch']}, "
                     f"{self['settings']['reps']} reps after {self['settings']['warmup']} warm-up_")
        return "\n".join(lines)


def stats_ms(times_s: Sequence[float]) -> Dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    p25, p50, p75 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(p50), "p25_ms": float(p25), "p75_ms": float(p75), "iqr_ms": float(p75 - p25),
            "min_ms": float(ms.min())}


def measure_latency(models: Dict[str, nn.Module], inputs, batch_sizes: Iterable[int] = (1, 16), threads: int = 1,
                    warmup: int = 3, reps: int = 20, pin_affinity: bool = False) -> LatencyResult:
    """Forward latency of several models, timed interleaved under the same conditions (see module docstring).

    models:  {name: model}; the first one is the baseline for speedups in `to_markdown`.
    inputs:  one example batch (tensor, dict or tuple of tensors; rows are repeated to each batch size) or a
             callable `batch_size -> inputs`.
    Models are put in eval mode and run under `torch.inference_mode()`.
    """
    if not models:
        raise ConfigError("measure_latency: models is empty; pass {'dense': model, 'pruned': other}")
    if reps < 1 or warmup < 0:
        raise ConfigError(f"measure_latency: need reps >= 1 and warmup >= 0, got reps={reps} warmup={warmup}")
    names = list(models)
    rows = []
    with pinned_threads(threads, pin_affinity), torch.inference_mode():
        for m in models.values():
            m.eval()
        for bs in batch_sizes:
            batch = repeat_to_batch(inputs, bs)
            for _ in range(warmup):
                for name in names:
                    call_model(models[name], batch)
            times = {name: [] for name in names}
            for rep in range(reps):
                k = rep % len(names)
                for name in names[k:] + names[:k]:  # rotate who goes first
                    dev = model_device(models[name]).type
                    sync_device(dev)
                    t0 = time.perf_counter()
                    call_model(models[name], batch)
                    sync_device(dev)
                    times[name].append(time.perf_counter() - t0)
            for name in names:
                st = stats_ms(times[name])
                rows.append({"model": name, "batch_size": bs, **st, "reps": reps,
                             "items_per_s": bs / (st["median_ms"] / 1e3)})
    return LatencyResult(rows=rows, env=environment_info() | {"torch_threads": threads},
                         settings={"threads": threads, "warmup": warmup, "reps": reps,
                                   "batch_sizes": list(batch_sizes), "interleaved": True,
                                   "pin_affinity": pin_affinity})

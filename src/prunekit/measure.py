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
import gc
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else whatever `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> Optional[str]:
    try:
        return __import__(mod).__version__
    except Exception:  # not installed, or broken install: record as absent rather than fail a measurement
        return None


def environment_info() -> Dict[str, Any]:
    """Hardware and software a number was measured on; attach it to every figure and table."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu_model": _cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": _version("transformers"), "onnxruntime": _version("onnxruntime"),
        "numpy": np.__version__, "cuda": None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["cuda"] = {"device": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gb": round(p.total_memory / 2 ** 30, 1), "cuda_version": torch.version.cuda}
    return info


# ----------------------------------------------------------------------------------------------- inputs
def _first_dim(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    if isinstance(x, Mapping):
        return _first_dim(next(iter(x.values())))
    if isinstance(x, (list, tuple)):
        return _first_dim(x[0])
    raise TypeError(f"inputs must be tensors (or a dict/tuple of tensors) with a batch dimension, got {type(x)}")


def make_batch(inputs, batch_size: int):
    """`inputs` resized to `batch_size` rows along dim 0 (rows repeated cyclically): one example input is
    enough to time any batch size. A callable `inputs(batch_size)` is called instead."""
    if callable(inputs):
        return inputs(batch_size)

    def grow(t):
        if not isinstance(t, torch.Tensor):
            return t
        reps = -(-batch_size // t.shape[0])
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size].contiguous()

    if isinstance(inputs, torch.Tensor):
        return grow(inputs)
    if isinstance(inputs, Mapping):
        return {k: grow(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(grow(t) for t in inputs)
    raise TypeError(f"inputs must be a tensor, a dict/tuple of tensors, or a callable batch_size -> inputs; "
                    f"got {type(inputs).__name__}")


def call_with_inputs(model, inputs):
    """Call a model the way its inputs ask: keyword arguments for a dict (HF tokenizer output), positional
    for a tuple/list, else a single argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def _sync(device_type: str):
    if device_type == "cuda":
        torch.cuda.synchronize()


def _device_type(model) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


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


def _stats_ms(times_s: Sequence[float]) -> Dict[str, float]:
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
        raise ValueError("measure_latency: models is empty; pass {'dense': model, 'pruned': other}")
    if reps < 1 or warmup < 0:
        raise ValueError(f"measure_latency: need reps >= 1 and warmup >= 0, got reps={reps} warmup={warmup}")
    names = list(models)
    rows = []
    with pinned_threads(threads, pin_affinity), torch.inference_mode():
        for m in models.values():
            m.eval()
        for bs in batch_sizes:
            batch = make_batch(inputs, bs)
            for _ in range(warmup):
                for name in names:
                    call_with_inputs(models[name], batch)
            times = {name: [] for name in names}
            for rep in range(reps):
                k = rep % len(names)
                for name in names[k:] + names[:k]:  # rotate who goes first
                    dev = _device_type(models[name])
                    _sync(dev)
                    t0 = time.perf_counter()
                    call_with_inputs(models[name], batch)
                    _sync(dev)
                    times[name].append(time.perf_counter() - t0)
            for name in names:
                st = _stats_ms(times[name])
                rows.append({"model": name, "batch_size": bs, **st, "reps": reps,
                             "items_per_s": bs / (st["median_ms"] / 1e3)})
    return LatencyResult(rows=rows, env=environment_info() | {"torch_threads": threads},
                         settings={"threads": threads, "warmup": warmup, "reps": reps,
                                   "batch_sizes": list(batch_sizes), "interleaved": True,
                                   "pin_affinity": pin_affinity})


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


# ----------------------------------------------------------------------------------------------- size
def _quantized_plain_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Plain tensors for dynamically quantized Linear layers (packed params are opaque to state_dict savers):
    int8 weight, its scale/zero point, and the float bias."""
    out = {}
    for name, mod in model.named_modules():
        packed = getattr(mod, "_packed_params", None)
        if packed is None or not hasattr(packed, "_weight_bias"):
            continue
        w, b = packed._weight_bias()
        out[f"{name}.weight_int8"] = w.int_repr().contiguous()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[f"{name}.weight_scale"] = w.q_per_channel_scales().float()
            out[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().int()
        else:
            out[f"{name}.weight_scale"] = torch.tensor([w.q_scale()], dtype=torch.float32)
            out[f"{name}.weight_zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int32)
        if b is not None:
            out[f"{name}.bias"] = b.detach().contiguous()
    return out


def plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict safetensors can store: quantized layers unpacked to int8 + scales, tied tensors kept once
    (as `safetensors.torch.save_model` does), non-tensor entries dropped."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor) or v.is_quantized:
            continue
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = (v.to_dense() if v.is_sparse else v).cpu().clone()  # clone: safetensors refuses shared storage
    out.update({k: v.cpu() for k, v in _quantized_plain_tensors(model).items()})
    return out


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's weights saved as safetensors (in memory; nothing is written)."""
    from safetensors.torch import save
    return len(save(plain_state_dict(model)))


def param_count(model: nn.Module, nonzero: bool = False) -> int:
    """Number of weights: unique parameters plus int8 weights of quantized layers (which have no Parameters).

    nonzero=True counts only non-zero entries, which is what unstructured (masked) pruning reduces."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += int(torch.count_nonzero(p)) if nonzero else p.numel()
    for k, v in _quantized_plain_tensors(model).items():
        if k.endswith(".weight_int8") or k.endswith(".bias"):
            total += int(torch.count_nonzero(v)) if nonzero else v.numel()
    return total


def model_stats(model: nn.Module, example_inputs=None, macs_fn: Optional[Callable] = None) -> Dict[str, Any]:
    """Params, size on disk and, when a MAC counter is available, MACs for `example_inputs`.

    macs_fn(model, example_inputs) -> int; defaults to `prunekit.flops.count_macs` when that module exists.
    """
    out = {"params": param_count(model), "size_bytes": size_on_disk(model), "macs": None}
    if example_inputs is not None:
        if macs_fn is None:
            try:
                from prunekit.flops import count_macs as macs_fn  # owned elsewhere; optional
            except ImportError:
                macs_fn = None
        if macs_fn is not None:
            out["macs"] = int(macs_fn(model, example_inputs))
    return out


# ----------------------------------------------------------------------------------------------- causal LM
def _lm_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: transformers >= 5.2x calls it `cache`, older versions
    `past_key_values`."""
    from .calibrate import forward_parameters
    return "cache" if "cache" in (forward_parameters(model) or ()) else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise TypeError(f"model output {type(out).__name__} has no KV cache (.cache / .past_key_values); "
                        f"decode_tokens_per_s needs a causal LM that supports use_cache=True")
    return cache


def prefill_latency(model: nn.Module, input_ids: torch.Tensor, reps: int = 10, warmup: int = 2,
                    threads: int = 1) -> Dict[str, float]:
    """Time to process a prompt and build the KV cache (one forward with use_cache=True); median/IQR in ms.

    Like `generate()`'s first step, only the last position's logits are computed (`logits_to_keep=1`) when
    the model's forward accepts it: prefill needs one next-token distribution, not one per prompt token."""
    ids = input_ids.to(_lm_device(model))
    kw = prefill_kwargs(model)
    times = []
    with pinned_threads(threads), torch.inference_mode():
        model.eval()
        for i in range(warmup + reps):
            _sync(ids.device.type)
            t0 = time.perf_counter()
            model(input_ids=ids, **kw)
            _sync(ids.device.type)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    st = _stats_ms(times)
    st.update(prompt_tokens=int(ids.shape[-1]), batch_size=int(ids.shape[0]), threads=threads,
              logits_to_keep=kw.get("logits_to_keep"))
    return st


def prefill_kwargs(model: nn.Module) -> Dict[str, Any]:
    """Forward keyword arguments of a generation prefill: use_cache=True, plus logits_to_keep=1 where the
    forward takes it (Hugging Face causal LMs since transformers 4.45; generate() passes the same)."""
    from .calibrate import forward_parameters
    kw: Dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in (forward_parameters(model) or ()):
        kw["logits_to_keep"] = 1
    return kw


def decode_tokens_per_s(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32, reps: int = 3,
                        threads: int = 1) -> Dict[str, Any]:
    """Greedy decoding speed with a KV cache, prefill excluded.

    The loop is written out (prefill once, then one token per forward with `past_key_values`) rather than
    timing `generate`, so the number is decode only, cannot stop early at EOS, and needs no generation config.
    Returns the median tokens/s over `reps` runs (per sequence: batch rows are not multiplied in).
    """
    ids = input_ids.to(_lm_device(model))
    cache_kw = _cache_kwarg(model)
    rates = []
    with pinned_threads(threads), torch.inference_mode():
        model.eval()
        for _ in range(reps + 1):  # first run warms up
            out = model(input_ids=ids, use_cache=True)
            past, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)
            _sync(ids.device.type)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
                past, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)
            _sync(ids.device.type)
            rates.append(new_tokens / (time.perf_counter() - t0))
    return {"tokens_per_s": float(statistics.median(rates[1:])), "all_tokens_per_s": rates[1:],
            "new_tokens": new_tokens, "prompt_tokens": int(ids.shape[-1]), "threads": threads}

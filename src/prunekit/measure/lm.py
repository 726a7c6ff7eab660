"""TODO"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict

import torch
import torch.nn as nn

from prunekit.batch import forward_parameters
from prunekit.errors import InputTypeError
from prunekit.measure.latency import pinned_threads, stats_ms, sync_device


# ----------------------------------------------------------------------------------------------- causal LM
def _lm_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: transformers >= 5.2x calls it `cache`, older versions
    `past_key_values`."""
    return "cache" if "cache" in (forward_parameters(model) or ()) else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise InputTypeError(f"model output {type(out).__name__} has no KV cache (.cache / .past_key_values); "
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
            sync_device(ids.device.type)
            t0 = time.perf_counter()
            model(input_ids=ids, **kw)
            sync_device(ids.device.type)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    st = stats_ms(times)
    st.update(prompt_tokens=int(ids.shape[-1]), batch_size=int(ids.shape[0]), threads=threads,
              logits_to_keep=kw.get("logits_to_keep"))
    return st


def prefill_kwargs(model: nn.Module) -> Dict[str, Any]:
    """Forward keyword arguments of a generation prefill: use_cache=True, plus logits_to_keep=1 where the
    forward takes it (Hugging Face causal LMs since transformers 4.45; generate() passes the same)."""
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
            sync_device(ids.device.type)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
                past, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)
            sync_device(ids.device.type)
            rates.append(new_tokens / (time.perf_counter() - t0))
    return {"tokens_per_s": float(statistics.median(rates[1:])), "all_tokens_per_s": rates[1:],
            "new_tokens": new_tokens, "prompt_tokens": int(ids.shape[-1]), "threads": threads}

"""Measure a model: latency (interleaved, pinned threads), memory, size, parameter/MAC counts, LM prefill/decode.
"""
from prunekit.measure.counts import count_macs, count_params
from prunekit.measure.env import environment_info
from prunekit.measure.latency import measure_latency
from prunekit.measure.lm import decode_tokens_per_s, prefill_latency
from prunekit.measure.memory import peak_memory
from prunekit.measure.size import model_stats, size_on_disk

__all__ = ["count_macs", "count_params", "environment_info", "measure_latency", "decode_tokens_per_s", "prefill_latency", "peak_memory", "model_stats", "size_on_disk"]

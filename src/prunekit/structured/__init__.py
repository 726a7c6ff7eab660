"""Steps 2-4 for structured pruning: score the graph's groups, allocate keep-counts, cut, verify.

config       Structured / MACs / Params (what to remove)
criteria     pure scoring functions (norms, Taylor, BN scale)
importance   importance configs and the statistics they collect (Magnitude, Taylor, Activation, ...)
allocate     ratio / global / MACs / params targets -> units to remove per group
latency      Latency target: measured per-group costs, bisection on measured speedup
sensitivity  per-group loss sensitivity -> per-group ratios
surgery      slice parameters and module attributes (the physical cut)
cut          cut a copy, run it, auto-ignore modules whose code ties sizes
handler      `pk.prune(model, Structured(...))`
"""
from prunekit.structured.config import MACs, Latency, Params, Structured
from prunekit.structured.experts import Experts
from prunekit.structured.handler import prune_structured
from prunekit.structured.importance import Activation, BNScale, Fluctuation, Importance, Magnitude, Random, Taylor
from prunekit.structured.sensitivity import sensitivity_ratios

__all__ = ["Experts", "MACs", "Params", "Structured", "Activation", "BNScale", "Fluctuation", "Importance", "Magnitude", "Random", "Taylor", "Latency", "sensitivity_ratios", "prune_structured"]

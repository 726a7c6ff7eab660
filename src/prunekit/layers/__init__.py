"""Depth pruning: remove whole blocks (block influence, angular distance, greedy loss).
"""
from prunekit.layers.depth import Layers, prune_layers

__all__ = ["Layers", "prune_layers"]

"""Unstructured and N:M sparsity: `pk.prune(model, pk.Sparse(sparsity=0.5, method="wanda", pattern="2:4"), data=...)`.

algorithms  pure tensor functions (magnitude / Wanda / SparseGPT masks, input statistics, OWL)
masks       masks as parametrizations, `bake`, `sparsity_stats`
config      the `Sparse` config and the choice of target layers
prune       its handler: calibration passes, per-block allocation (OWL / sensitivity), the plan
"""
from prunekit.sparse.algorithms import (
    InputStats,
    magnitude_mask,
    mask_from_scores,
    outlier_ratio,
    owl_block_sparsity,
    parse_pattern,
    pattern_sparsity,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)
from prunekit.sparse.masks import SparseMask, apply_mask, bake, masks, sparsity_stats
from prunekit.sparse.config import Sparse, select_targets
from prunekit.sparse.prune import prune_sparse

__all__ = ["InputStats", "magnitude_mask", "mask_from_scores", "outlier_ratio", "owl_block_sparsity", "parse_pattern", "pattern_sparsity", "sparsegpt_prune", "wanda_mask", "wanda_scores", "SparseMask", "apply_mask", "bake", "masks", "sparsity_stats", "Sparse", "prune_sparse", "select_targets"]

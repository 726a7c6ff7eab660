"""One-shot weight sparsity: `pk.prune(model, pk.Sparse(sparsity=0.5, method="wanda", pattern="2:4"), data=...)`.

algorithms  pure tensor functions (magnitude / Wanda / SparseGPT masks, input statistics, OWL)
masks       masks as parametrizations, `bake`, `sparsity_stats`
prune       the `Sparse` config and its handler
"""
from .algorithms import (InputStats, magnitude_mask, mask_from_scores, outlier_ratio, owl_block_sparsity,
                         parse_pattern, pattern_sparsity, sparsegpt_prune, wanda_mask, wanda_scores)
from .masks import SparseMask, apply_mask, bake, masks, sparsity_stats
from .prune import Sparse, prune_sparse, select_targets

__all__ = ["Sparse", "prune_sparse", "select_targets", "bake", "masks", "sparsity_stats", "apply_mask",
           "SparseMask", "InputStats", "magnitude_mask", "mask_from_scores", "wanda_scores", "wanda_mask",
           "sparsegpt_prune", "parse_pattern", "pattern_sparsity", "owl_block_sparsity", "outlier_ratio"]

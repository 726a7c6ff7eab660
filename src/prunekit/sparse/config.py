"""The `Sparse` config (what to sparsify, how, how much) and the choice of its target layers.

    pk.Sparse(sparsity=0.5, method="wanda", pattern="2:4", allocation="sensitivity")
"""
from __future__ import annotations

import dataclasses
import re
from typing import List, Optional, Sequence

import torch.nn as nn

from prunekit.config import Config, check_type, register_config
from prunekit.errors import ConfigError
from prunekit.models.moe import find_moe_blocks
from prunekit.sparse.algorithms import parse_pattern
from prunekit.sparse.experts import expert_targets
from prunekit.sparse.masks import is_sparse_target, weight_2d

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "sensitivity")
PIPELINES = ("layerwise", "whole")
# Default exclusions: the output head and anything embedding-like (their rows are looked up, not summed).
_DEFAULT_IGNORE = (r"(^|\.)lm_head$", r"embed")


@register_config
@dataclasses.dataclass
class Sparse(Config):
    """Zero a fraction of the weights of linear and convolution layers.

    sparsity    fraction of zeros per layer, in [0, 1). For N:M patterns it must equal 1 - N/M.
    method      "magnitude" (|W|, no data), "wanda" (|W| * input norm, per output row) or "sparsegpt"
                (OBS reconstruction of the kept weights from the input Hessian). Wanda/SparseGPT need `data=`.
    pattern     "unstructured" or "N:M" (keep N of every M consecutive input weights, e.g. "2:4").
    targets     regexes (re.search on module names) selecting layers; default: every nn.Linear, Conv1D and
                ungrouped nn.Conv1d/Conv2d (kernels as (out, in*kh*kw) matrices, inputs unfolded into patches;
                N:M groups run along that flattened input) except lm_head, embeddings and weights tied to
                the input embedding. Grouped/depthwise convolutions are not targets.
    ignore      regexes of module names to leave dense.
    allocation  how the overall `sparsity` is spread over blocks (transformer blocks; each layer on its own in
                models without a block stack). Block sparsities span 2 * owl_lambda and average exactly
                `sparsity` (same mapping as OWL):
                  "uniform"      every layer gets `sparsity`;
                  "owl"          outlier-weighted (Yin et al. 2023): blocks whose Wanda scores hold more outliers
                                 (above owl_m x mean) get lower sparsity;
                  "sensitivity"  measured: each block alone is pruned to `sensitivity_sparsity` with Wanda masks
                                 and the rise of the calibration loss (language models: next-token loss; others:
                                 relative output error) over `sensitivity_batches` batches is its sensitivity;
                                 more sensitive blocks get lower sparsity. Weights are restored after each probe.
    owl         shorthand for allocation="owl" (kept for existing recipes).
    dampening   SparseGPT: fraction of the mean Hessian diagonal added to it. blocksize: columns per lazy update.
    sequential  feed each pruned block's outputs to the next block (errors get compensated downstream).
    pipeline    "layerwise" (block by block, low memory) or "whole" (one forward with hooks everywhere,
                statistics of the dense model; needs sequential=False).
    bake        remove the mask parametrizations at the end, leaving plain weights with zeros.
    """
    sparsity: float = 0.5
    method: str = "magnitude"
    pattern: str = "unstructured"
    targets: Optional[List[str]] = None
    ignore: Sequence[str] = ()
    owl: bool = False
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    allocation: str = "uniform"
    sensitivity_sparsity: float = 0.7
    sensitivity_batches: int = 4
    dampening: float = 0.01
    blocksize: int = 128
    sequential: bool = True
    bake: bool = False
    pipeline: str = "layerwise"

    def __post_init__(self):
        o = "Sparse"
        check_type(o, "sparsity", self.sparsity, (int, float), "a number in [0, 1)")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"{o}.sparsity must be in [0, 1) (the fraction of weights set to zero), got {self.sparsity!r}")
        self.sparsity = float(self.sparsity)
        if self.method not in METHODS:
            raise ConfigError(f"{o}.method must be one of {METHODS}, got {self.method!r}")
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as e:
            raise ConfigError(f"{o}.pattern: {e}") from None
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(f"{o}.sparsity={self.sparsity} does not match pattern {self.pattern!r}, which keeps "
                                  f"{nm[0]} of every {nm[1]} weights (sparsity {implied:g}); set sparsity={implied:g}")
            if self.owl or self.allocation != "uniform":
                raise ConfigError(f"{o}.owl / allocation={self.allocation!r} distribute unstructured sparsity across "
                                  f"blocks; they cannot be combined with pattern {self.pattern!r}. Use "
                                  f"pattern='unstructured' or allocation='uniform'")
        for field in ("targets", "ignore"):
            value = getattr(self, field)
            if value is None and field == "targets":
                continue
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{o}.{field} must be a list of regex strings, got {value!r}")
            for rx in value:
                if not isinstance(rx, str):
                    raise ConfigError(f"{o}.{field} must contain regex strings, got {rx!r}")
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ConfigError(f"{o}.{field}: invalid regex {rx!r}: {e}") from None
        if self.targets is not None and not self.targets:
            raise ConfigError(f"{o}.targets is an empty list, so nothing would be pruned; use None for the default")
        for field in ("owl", "sequential", "bake"):
            check_type(o, field, getattr(self, field), bool, "True or False")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"{o}.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.owl and self.allocation not in ("uniform", "owl"):
            raise ConfigError(f"{o}.owl=True asks for allocation='owl' but allocation={self.allocation!r}; set only one")
        if self.owl:
            self.allocation = "owl"
        check_type(o, "sensitivity_sparsity", self.sensitivity_sparsity, (int, float), "a number in (0, 1)")
        if not 0.0 < self.sensitivity_sparsity < 1.0:
            raise ConfigError(f"{o}.sensitivity_sparsity must be in (0, 1), got {self.sensitivity_sparsity!r}")
        check_type(o, "sensitivity_batches", self.sensitivity_batches, int, "a positive int")
        if self.sensitivity_batches < 1:
            raise ConfigError(f"{o}.sensitivity_batches must be >= 1, got {self.sensitivity_batches!r}")
        check_type(o, "owl_lambda", self.owl_lambda, (int, float), "a number")
        check_type(o, "owl_m", self.owl_m, (int, float), "a number")
        check_type(o, "dampening", self.dampening, (int, float), "a number")
        check_type(o, "blocksize", self.blocksize, int, "a positive int")
        if self.allocation != "uniform" and not (0.0 <= 2 * self.owl_lambda <= self.sparsity
                                                 and self.sparsity + 2 * self.owl_lambda < 1):
            # block sparsities span 2*lambda around the mean, so each may sit up to 2*lambda from it
            raise ConfigError(f"{o}.owl_lambda={self.owl_lambda} could push a block's sparsity outside [0, 1): "
                              f"need 0 <= 2*owl_lambda <= sparsity ({self.sparsity}) and sparsity + 2*owl_lambda < 1")
        if self.owl_m <= 0:
            raise ConfigError(f"{o}.owl_m must be > 0 (outliers are scores above owl_m x mean), got {self.owl_m!r}")
        if self.dampening < 0:
            raise ConfigError(f"{o}.dampening must be >= 0, got {self.dampening!r}")
        if self.blocksize < 1:
            raise ConfigError(f"{o}.blocksize must be >= 1, got {self.blocksize!r}")
        if self.pipeline not in PIPELINES:
            raise ConfigError(f"{o}.pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if self.pipeline == "whole" and self.sequential:
            raise ConfigError(f"{o}.pipeline='whole' collects all statistics from the dense model in one pass, so it "
                              f"cannot feed pruned outputs forward; set sequential=False or pipeline='layerwise'")
        if self.ignore is not None:
            self.ignore = list(self.ignore)

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude" or self.allocation != "uniform"


# ------------------------------------------------------------------------------------------------ targets

def select_targets(model: nn.Module, cfg: Sparse) -> List[str]:
    """Names of the linear/conv layers `cfg` prunes, in module order. Raises ConfigError if a `targets` regex
    matches no such layer or nothing is left to prune."""
    linear = [(n, m) for n, m in model.named_modules() if n and is_sparse_target(m)]
    # layers sharing their weight with an embedding table (tied LM heads) stay dense; found without
    # get_input_embeddings, which multi-tower and vision models do not implement
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = {n for n, m in linear if id(m.weight) in tables}
    if cfg.targets is None:
        chosen = [n for n, _ in linear if n not in tied and not any(re.search(rx, n) for rx in _DEFAULT_IGNORE)]
    else:
        chosen = []
        stacked = [w.name for b in find_moe_blocks(model) for w in b.weights]     # 3-D expert weights
        for rx in cfg.targets:
            if not any(re.search(rx, n) for n, _ in linear) and not any(re.search(rx, n) for n in stacked):
                sample = ", ".join(n for n, _ in linear[:4])
                raise ConfigError(f"Sparse.targets: regex {rx!r} matches no linear or ungrouped conv layer of "
                                  f"{type(model).__name__} (they look like: {sample})")
        chosen = [n for n, _ in linear if any(re.search(rx, n) for rx in cfg.targets)]
    chosen = [n for n in chosen if not any(re.search(rx, n) for rx in cfg.ignore)]
    if not chosen and not expert_targets(model, cfg.targets, cfg.ignore):
        raise ConfigError(f"Sparse: no linear/conv layer of {type(model).__name__} is left to prune after targets="
                          f"{cfg.targets!r} and ignore={list(cfg.ignore)!r}")
    return chosen


def check_nm_shapes(model: nn.Module, names: List[str], pattern: str) -> None:
    nm = parse_pattern(pattern)
    if nm is None:
        return
    modules = dict(model.named_modules())
    bad = [f"{n} (in_features={weight_2d(modules[n]).shape[1]})" for n in names
           if weight_2d(modules[n]).shape[1] % nm[1]]
    if bad:
        raise ConfigError(f"Sparse.pattern={pattern!r} groups input weights by {nm[1]}, but these layers' input size is "
                          f"not divisible by {nm[1]}: {', '.join(bad[:5])}; add them to ignore=[...]")

"""What structured pruning removes and how much: the Structured config and its resource targets (MACs,
Params, a measured Latency speedup)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Callable, Dict, Optional, Sequence, Union

from prunekit.config import Config, check_type, register_config
from prunekit.errors import ConfigError


@register_config
@dataclasses.dataclass
class MACs(Config):
    """Resource target: remove `ratio` of the model's multiply-accumulates (0.5 = half the MACs)."""
    ratio: float = 0.5

    def __post_init__(self):
        _check_ratio("MACs", "ratio", self.ratio)


@register_config
@dataclasses.dataclass
class Params(Config):
    """Resource target: remove `ratio` of the model's parameters."""
    ratio: float = 0.5

    def __post_init__(self):
        _check_ratio("Params", "ratio", self.ratio)


def _check_ratio(owner, name, r):
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 <= float(r) < 1.0) or math.isnan(r):
        raise ConfigError(f"{owner}.{name} must be a number in [0, 1), got {r!r}")


IMPORTANCES = ("auto", "l1", "l2", "random")


LATENCY_ALLOCATIONS = ("cost", "uniform")
LATENCY_STATISTICS = ("median", "min")


@register_config
@dataclasses.dataclass
class Latency(Config):
    """Resource target: a measured speedup of the forward pass.

    speedup:     requested dense latency / pruned latency (> 1).
    batch_size:  batch the latency is measured at (the example inputs' rows are repeated to this size).
    max_ratio:   most of any group that may be removed in pursuit of the target.
    threads:     torch CPU threads while timing (pinned, restored after).
    allocation:  "cost" (importance / measured latency cost per unit, HALP-style) or "uniform".
    cost_weight: exponent of the cost in the priority (0 = ignore latency, pure importance ranking).
    probe_ratio: fraction of a group removed when probing its latency cost.
    tolerance:   relative error accepted on the speedup before the search stops.
    reps/warmup: timing repetitions (interleaved) per measurement; the final check uses 3 x reps.
    statistic:   "min" (default: steadiest on a shared, loaded machine, where medians swing by 2x) or "median".
    """
    speedup: float = 1.5
    batch_size: int = 16
    max_ratio: float = 0.9
    threads: int = 1
    allocation: str = "cost"
    cost_weight: float = 0.5
    probe_ratio: float = 0.5
    tolerance: float = 0.03
    reps: int = 15
    warmup: int = 3
    statistic: str = "min"
    max_evals: int = 12

    def __post_init__(self):
        o = "Latency"
        check_type(o, "speedup", self.speedup, (int, float), "a number > 1")
        if not math.isfinite(self.speedup) or self.speedup <= 1.0:
            raise ConfigError(f"{o}.speedup must be > 1 (dense latency / pruned latency), got {self.speedup!r}")
        for name in ("batch_size", "threads", "reps", "max_evals"):
            check_type(o, name, getattr(self, name), int, "a positive int")
            if getattr(self, name) < 1:
                raise ConfigError(f"{o}.{name} must be >= 1, got {getattr(self, name)}")
        check_type(o, "warmup", self.warmup, int, "an int >= 0")
        for name in ("max_ratio", "probe_ratio"):
            v = getattr(self, name)
            check_type(o, name, v, (int, float), "a number in (0, 1)")
            if not 0.0 < v < 1.0:
                raise ConfigError(f"{o}.{name} must be in (0, 1), got {v!r}")
        check_type(o, "tolerance", self.tolerance, (int, float), "a number in (0, 0.5)")
        if not 0.0 < self.tolerance < 0.5:
            raise ConfigError(f"{o}.tolerance must be in (0, 0.5), got {self.tolerance!r}")
        check_type(o, "cost_weight", self.cost_weight, (int, float), "a number >= 0")
        if self.cost_weight < 0:
            raise ConfigError(f"{o}.cost_weight must be >= 0, got {self.cost_weight!r}")
        if self.allocation not in LATENCY_ALLOCATIONS:
            raise ConfigError(f"{o}.allocation must be one of {LATENCY_ALLOCATIONS}, got {self.allocation!r}")
        if self.statistic not in LATENCY_STATISTICS:
            raise ConfigError(f"{o}.statistic must be one of {LATENCY_STATISTICS}, got {self.statistic!r}")


@register_config
@dataclasses.dataclass
class Structured(Config):
    """Remove whole channels / neurons / heads through the dependency graph.

    ratio:        fraction of each group's units to remove (float), or {module-name regex: ratio}; groups
                  whose modules match no pattern are left alone. Ignored when `target` is given.
    importance:   "auto" | "l1" | "l2" | "random" | callable(group, tensors) -> (n_units,) scores (higher = keep).
                  "auto" (default) is L2 magnitude, except for Hugging Face causal LMs given calibration data
                  (`pk.prune(lm, cfg, example_inputs=..., data=batches)`): first-order Taylor on the LM loss.
                  Magnitude scores wreck LLM widths (SmolLM2-135M: perplexity ~4e5 vs ~90 with Taylor).
    global_ranking: rank units across groups (scores normalized per group) instead of the same ratio per group.
    round_to:     keep-counts become multiples of this many channels (hardware-friendly widths).
    ignore:       module names or regexes whose parameters are left untouched.
    max_ratio_per_layer: never remove more than this fraction of any group.
    target:       a resource goal instead of a ratio: pk.MACs(ratio=...) or pk.Params(ratio=...).
    prune_hidden: also prune the residual stream (hidden size) of Hugging Face transformers. Default: False for
                  transformers (heads and FFN neurons only), True for every other model.
    gqa:          grouped-query attention: "groups" removes a KV head with all its query heads; "query_heads"
                  keeps the KV heads and removes the same number of query heads from every group.
    convert_mha:  replace `nn.MultiheadAttention` by `prunekit.nn.MultiheadAttention` (same function, separate
                  q/k/v projections) so its heads can be pruned; recorded in the plan and repeated by pk.load.
    uniform:      every repeated block keeps the same number of heads / KV groups / FFN neurons (each block still
                  chooses which by its own scores), so a plain config (and llama.cpp's own architectures)
                  expresses the result; the count is the mean of what the blocks would keep on their own.
                  Families whose head size is hidden_size / heads (BERT, GPT-2, OPT, Falcon, GPT-NeoX) also
                  shrink the hidden size in proportion (unless prune_hidden=False), so plain `from_pretrained`
                  reloads them; where the outputs carry the hidden size (BertModel) a warning says so.
    tp_degree:    tensor-parallel degree: attention groups (KV heads) keep a multiple of it.
    verify:       after the cut, run the pruned model and the dense model with the removed slices zeroed (in
                  place, restored exactly) on the example inputs and raise VerificationError if they differ
                  beyond float error (normalizations over pruned channels: reported as approximate).
    """
    ratio: Union[float, Dict[str, float]] = 0.5
    importance: Union[str, Callable] = "auto"
    global_ranking: bool = False
    round_to: int = 1
    ignore: Sequence[str] = ()
    max_ratio_per_layer: float = 0.9
    target: Optional[Config] = None
    seed: int = 0
    prune_hidden: Optional[bool] = None
    convert_mha: bool = True
    gqa: str = "groups"
    uniform: bool = False
    tp_degree: Optional[int] = None
    verify: bool = True

    def __post_init__(self):
        if isinstance(self.ratio, dict):
            for k, v in self.ratio.items():
                if not isinstance(k, str):
                    raise ConfigError(f"Structured.ratio keys must be module-name regexes, got {k!r}")
                _check_ratio("Structured", f"ratio['{k}']", v)
        else:
            _check_ratio("Structured", "ratio", self.ratio)
        if isinstance(self.importance, str) and self.importance not in IMPORTANCES:
            raise ConfigError(f"Structured.importance must be one of {IMPORTANCES} or a callable, "
                              f"got {self.importance!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"Structured.round_to must be an int >= 1, got {self.round_to!r}")
        if not (0.0 < float(self.max_ratio_per_layer) <= 1.0):
            raise ConfigError(f"Structured.max_ratio_per_layer must be in (0, 1], got {self.max_ratio_per_layer!r}")
        if self.tp_degree is not None and (isinstance(self.tp_degree, bool) or not isinstance(self.tp_degree, int)
                                           or self.tp_degree < 1):
            raise ConfigError(f"Structured.tp_degree must be an int >= 1 or None, got {self.tp_degree!r}")
        if self.gqa not in ("groups", "query_heads"):
            raise ConfigError(f"Structured.gqa must be 'groups' or 'query_heads', got {self.gqa!r}")
        if not isinstance(self.verify, bool):
            raise ConfigError(f"Structured.verify must be True or False, got {self.verify!r}")
        if isinstance(self.ignore, str):
            self.ignore = [self.ignore]
        self.ignore = list(self.ignore)
        for field, patterns in (("ratio", self.ratio if isinstance(self.ratio, dict) else {}), ("ignore", self.ignore)):
            for pat in patterns:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ConfigError(f"Structured.{field}: {pat!r} is not a valid regex ({e}); escape special "
                                      f"characters (re.escape) or fix the pattern") from None
        if self.target is not None and not isinstance(self.target, (MACs, Params, Latency)):
            raise ConfigError(f"Structured.target must be pk.MACs(...), pk.Params(...) or pk.Latency(...), "
                              f"got {self.target!r}")


def matches_module(pattern: str, name: str) -> bool:
    """How `ratio` / `ignore` patterns select modules: full regex match, the exact name, or a parent's name."""
    return name == pattern or name.startswith(pattern + ".") or re.fullmatch(pattern, name) is not None


def check_patterns_match(cfg: Structured, names, tensor_names=()) -> None:
    """ConfigError for a `ratio` / `ignore` pattern that selects no module (it would silently do nothing),
    naming the closest module names. `ignore` may also name the model's own parameters and buffers
    (`tensor_names`, e.g. a class token or position embedding used outside any module)."""
    names = [n for n in names if n]
    for field, patterns in (("ratio", cfg.ratio if isinstance(cfg.ratio, dict) else {}), ("ignore", cfg.ignore)):
        pool = names + [t for t in tensor_names if t] if field == "ignore" else names
        for pat in patterns:
            if not any(matches_module(pat, n) for n in pool):
                close = difflib.get_close_matches(pat, pool, n=3, cutoff=0.4) or names[:3]
                raise ConfigError(f"Structured.{field}: pattern {pat!r} matches no module of this model, so it "
                                  f"would do nothing; closest module names: {close}")

"""Importance criteria for structured groups, as config objects usable wherever `Structured.importance` is.

    pk.Structured(ratio=0.5, importance=Taylor(data=batches))           # first-order Taylor, |w * dL/dw|
    pk.Structured(ratio=0.5, importance=Activation(data=batches, kind="apoz"))
    pk.Structured(ratio=0.5, importance=BNScale())                       # network slimming
    pk.Structured(ratio=0.5, importance=Magnitude(p=1, agg="max", norm=None))

Every criterion is two layers:

* a *pure function* from per-member channel values to per-unit scores (`combine`, `bn_scale_scores`,
  `apoz_to_importance`, ... in structured/criteria.py), unit-tested on hand-computed cases;
* a *callable config* `(group, tensors) -> scores` that gathers what the function needs. Data-aware
  criteria (Taylor, Activation) need the model: `prepare(model, graph)` runs the calibration batches once
  (gradients or forward hooks: the collectors in structured/statistics.py) and caches per-tensor channel
  values, keyed by tensor *name*, so a graph that is re-traced (structured pruning re-traces when it
  auto-ignores modules) still finds them.

Scores are combined over the members of a group with `agg` ("sum" | "mean" | "max") after a per-member
(`norm`: "mean" | "max" | "sum" | None) normalization, so a wide consumer matrix does not drown the
producer's own weights. Higher = more important = kept.

`sensitivity_ratios` is an allocation helper, not a criterion: it measures how much the calibration loss
grows when each group alone is pruned, and returns per-group ratios (a `{regex: ratio}` dict that
`Structured.ratio` accepts) that give sensitive groups less pruning under the same overall budget.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from prunekit.config import Config, check_type, config_from_dict, register_config
from prunekit.errors import ConfigError
from prunekit.objective import calibration_batches
from prunekit.structured import criteria as S
from prunekit.structured.criteria import (
    AGGS,
    ChannelValues,
    apoz_to_importance,
    bn_scale_scores,
    combine,
    fluctuation_values,
    magnitude_channel_values,
)
from prunekit.structured.statistics import accumulate_taylor, collect_activations, collect_input_moments

NORMS = ("mean", "max", "sum", None)
ACTIVATION_KINDS = ("mean", "apoz")


# --------------------------------------------------------------------------------------------- configs


def _check_common(owner: str, agg: str, norm: Optional[str]):
    if agg not in AGGS:
        raise ConfigError(f"{owner}.agg must be one of {AGGS}, got {agg!r}")
    if norm not in NORMS:
        raise ConfigError(f"{owner}.norm must be one of {NORMS}, got {norm!r}")


class Importance(Config):
    """Base of the importance configs: callable `(group, tensors) -> (n_units,) scores`.

    Fields named in `_runtime` (calibration data, loss functions) are not part of the YAML form; a recipe
    attaches the run's calibration data with `bind`."""
    _runtime: Tuple[str, ...] = ()

    def prepare(self, model: nn.Module, graph) -> None:
        """Gather what scoring needs from `model` (no-op for data-free criteria)."""

    def bind(self, data=None, loss_fn=None) -> "Importance":
        """A copy with calibration `data` / `loss_fn` filled in where they are still None."""
        kw = {}
        if "data" in self._runtime and getattr(self, "data") is None and data is not None:
            kw["data"] = data
        if "loss_fn" in self._runtime and getattr(self, "loss_fn") is None and loss_fn is not None:
            kw["loss_fn"] = loss_fn
        return dataclasses.replace(self, **kw) if kw else self

    @property
    def needs_data(self) -> bool:
        return "data" in self._runtime

    def __call__(self, group, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


@register_config
@dataclasses.dataclass
class Magnitude(Importance):
    """L1 (p=1) or L2 (p=2) norm of every parameter slice of a unit, normalized per member and combined."""
    p: int = 2
    agg: str = "sum"
    norm: Optional[str] = "mean"

    def __post_init__(self):
        if self.p not in (1, 2):
            raise ConfigError(f"Magnitude.p must be 1 or 2, got {self.p!r}")
        _check_common("Magnitude", self.agg, self.norm)

    def __call__(self, group, tensors):
        return combine(group, magnitude_channel_values(group, tensors, self.p), self.agg, self.norm)


@register_config
@dataclasses.dataclass
class Random(Importance):
    """Uniformly random scores (a baseline: any criterion worth using must beat it)."""
    seed: int = 0

    def __post_init__(self):
        check_type("Random", "seed", self.seed, int, "an int")
        self._gen = torch.Generator().manual_seed(self.seed)

    def __call__(self, group, tensors):
        return S.random_scores(group, self._gen)


@register_config
@dataclasses.dataclass
class BNScale(Importance):
    """Network slimming: |gamma| of the BatchNorms on the group's channels (sum over BNs sharing them).

    Groups without a BatchNorm (e.g. a linear layer) fall back to `fallback` magnitude (p=2) with a warning,
    since gamma says nothing about them."""
    agg: str = "sum"
    norm: Optional[str] = None
    fallback: str = "l2"

    def __post_init__(self):
        _check_common("BNScale", self.agg, self.norm)
        if self.fallback not in ("l1", "l2"):
            raise ConfigError(f"BNScale.fallback must be 'l1' or 'l2', got {self.fallback!r}")
        self._bn: Optional[List[str]] = None
        self.fallbacks: List[int] = []

    def prepare(self, model, graph):
        self._bn = [f"{n}.weight" for n, m in model.named_modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]

    def __call__(self, group, tensors):
        bn = self._bn if self._bn is not None else [n for n in tensors if _looks_like_bn_weight(n, tensors)]
        s = bn_scale_scores(group, tensors, bn, self.agg, self.norm)
        if s is not None:
            return s
        self.fallbacks.append(group.index)
        warnings.warn(f"BNScale: {group.describe()} has no BatchNorm; ranked by {self.fallback} magnitude "
                      f"instead", stacklevel=2)
        return combine(group, magnitude_channel_values(group, tensors, 1 if self.fallback == "l1" else 2))


def _looks_like_bn_weight(name: str, tensors) -> bool:
    """Without the model (prepare not called): a 1-D weight with running statistics next to it."""
    base = name[:-len(".weight")] if name.endswith(".weight") else None
    return base is not None and f"{base}.running_var" in tensors and tensors[name].dim() == 1


@register_config
@dataclasses.dataclass
class Taylor(Importance):
    """First-order Taylor importance (Molchanov et al. 2019): |sum_slice w * dL/dw| per channel, summed over
    calibration batches, then normalized per member and combined over the group.

    data:    calibration batches ((inputs, targets) or inputs for models that return .loss); not in YAML.
    loss_fn: loss_fn(output, targets) -> scalar; default cross-entropy / output.loss. Not in YAML.
    batches: how many calibration batches to use."""
    batches: int = 8
    agg: str = "sum"
    norm: Optional[str] = "mean"
    data: Any = None
    loss_fn: Optional[Callable] = None
    quiet: bool = True
    _runtime = ("data", "loss_fn")

    def __post_init__(self):
        check_type("Taylor", "batches", self.batches, int, "a positive int")
        if self.batches < 1:
            raise ConfigError(f"Taylor.batches must be >= 1, got {self.batches}")
        _check_common("Taylor", self.agg, self.norm)
        self._values: Optional[ChannelValues] = None
        self._graph_id: Optional[int] = None

    def prepare(self, model, graph):
        if self._values is not None and self._graph_id == id(graph):
            return                                   # already calibrated on this very graph
        self._graph_id = id(graph)
        wanted = [(m.name, m.dim) for g in graph.groups for m in g.members if not m.is_buffer]
        self._values = accumulate_taylor(model, calibration_batches(self.data, self.batches), wanted,
                                         self.loss_fn, self.quiet)

    def __call__(self, group, tensors):
        if self._values is None:
            raise RuntimeError("Taylor importance has no gradients yet: call .prepare(model, graph) before "
                           "scoring (prunekit.pipeline and structured pruning do this for you)")
        return combine(group, self._values, self.agg, self.norm)


@register_config
@dataclasses.dataclass
class Activation(Importance):
    """Activation-based importance from forward hooks on the modules producing a group's channels.

    kind="mean": mean |activation| per channel. kind="apoz": 1 - average percentage of zeros (outputs <= 0,
    i.e. zero after a ReLU). Producer outputs of one group (conv, its BatchNorm, residual partners) are
    combined with `agg`."""
    kind: str = "mean"
    batches: int = 8
    agg: str = "sum"
    norm: Optional[str] = "mean"
    data: Any = None
    quiet: bool = True
    _runtime = ("data",)

    def __post_init__(self):
        if self.kind not in ACTIVATION_KINDS:
            raise ConfigError(f"Activation.kind must be one of {ACTIVATION_KINDS}, got {self.kind!r}")
        check_type("Activation", "batches", self.batches, int, "a positive int")
        _check_common("Activation", self.agg, self.norm)
        self._stats: Optional[Dict[str, Dict[str, torch.Tensor]]] = None
        self._graph_id: Optional[int] = None

    def prepare(self, model, graph):
        if self._stats is not None and self._graph_id == id(graph):
            return                                   # already calibrated on this very graph
        self._graph_id = id(graph)
        mods = [p for g in graph.groups for p in g.producers]
        self._stats = collect_activations(model, calibration_batches(self.data, self.batches), mods, self.quiet)

    def channel_values(self, group) -> ChannelValues:
        """(producer weight name, 0) -> per-channel statistic of that producer's output."""
        out = {}
        for prod in group.producers:
            st = self._stats.get(prod)
            if st is None:
                continue
            v = st["mean_abs"] if self.kind == "mean" else apoz_to_importance(st["apoz"])
            for m in group.members:
                if m.name.rpartition(".")[0] == prod and m.dim == 0 and not m.is_buffer and v.numel() > int(m.pos.max()):
                    out[(m.name, m.dim)] = v
                    break
        return out

    def __call__(self, group, tensors):
        if self._stats is None:
            raise RuntimeError("Activation importance has no statistics yet: call .prepare(model, graph) first "
                               "(prunekit.pipeline and structured pruning do this for you)")
        vals = self.channel_values(group)
        if not vals:
            return combine(group, magnitude_channel_values(group, tensors, 2), self.agg, self.norm)
        return combine(group, vals, self.agg, self.norm)


@register_config
@dataclasses.dataclass
class Fluctuation(Importance):
    """FLAP-style structured importance for transformers (heads, FFN neurons): the fluctuation of each channel
    at the input of the Linear layers that consume it (o_proj / down_proj / fc2), Var(X_j) * ||W[:, j]||^2.

    With `bias_compensation` (default) the pruned channels' mean contribution W[:, j] * E[X_j] is added to
    the consumer's bias after the cut (a bias is created where the layer had none; `pk.load` recreates it).
    Groups without a Linear consumer fall back to L2 magnitude."""
    batches: int = 8
    agg: str = "sum"
    norm: Optional[str] = "mean"
    bias_compensation: bool = True
    data: Any = None
    quiet: bool = True
    _runtime = ("data",)

    def __post_init__(self):
        check_type("Fluctuation", "batches", self.batches, int, "a positive int")
        _check_common("Fluctuation", self.agg, self.norm)
        self._moments: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None
        self._graph_id: Optional[int] = None

    @staticmethod
    def _consumers(graph, group):
        return [m for m in group.members if graph.is_consumer(m) and m.name.endswith(".weight")]

    def prepare(self, model, graph):
        if self._moments is not None and self._graph_id == id(graph):
            return
        self._graph_id = id(graph)
        mods = [m.name.rpartition(".")[0] for g in graph.groups for m in self._consumers(graph, g)]
        self._moments = collect_input_moments(model, calibration_batches(self.data, self.batches), mods,
                                              self.quiet)
        self._graph = graph

    def __call__(self, group, tensors):
        if self._moments is None:
            raise RuntimeError("Fluctuation importance has no statistics yet: call .prepare(model, graph) first")
        vals = {}
        for m in self._consumers(self._graph, group):
            mom = self._moments.get(m.name.rpartition(".")[0])
            if mom is not None:
                vals[(m.name, m.dim)] = fluctuation_values(mom[1], tensors[m.name])
        if not vals:
            return combine(group, magnitude_channel_values(group, tensors, 2), self.agg, self.norm)
        return combine(group, vals, self.agg, self.norm)

    def compensate(self, original: nn.Module, pruned: nn.Module, kept: Dict[str, Dict[int, List[int]]]) -> List[str]:
        """Fold the removed input channels' mean contribution into the consumers' biases; returns the modules
        that got a new bias parameter."""
        if not self.bias_compensation or not self._moments:
            return []
        added = []
        for mod_name, (mean, _) in self._moments.items():
            dims = kept.get(f"{mod_name}.weight")
            if not dims or 1 not in dims:
                continue
            w_old = original.get_submodule(mod_name).weight.detach()
            gone = torch.ones(w_old.shape[1], dtype=torch.bool)
            gone[torch.as_tensor(dims[1], dtype=torch.long)] = False
            delta = w_old[:, gone].float() @ mean[gone]                       # (out_features,)
            if 0 in dims:
                delta = delta[torch.as_tensor(dims[0], dtype=torch.long)]
            lin = pruned.get_submodule(mod_name)
            with torch.no_grad():
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.weight.shape[0], dtype=lin.weight.dtype,
                                                        device=lin.weight.device))
                    added.append(mod_name)
                lin.bias.add_(delta.to(lin.bias.dtype))
        return added


def resolve(importance) -> Any:
    """A `Structured.importance` value as used by prunekit: strings stay strings, dicts become configs."""
    if isinstance(importance, dict):
        return config_from_dict(importance)
    return importance


def prepare(importance, model: nn.Module, graph, data=None, loss_fn=None):
    """Bind calibration data (if the criterion wants it and has none) and run its `prepare`; returns the
    (possibly new) importance object to put into the Structured config."""
    if isinstance(importance, Importance):
        importance = importance.bind(data, loss_fn)
    if hasattr(importance, "prepare"):
        importance.prepare(model, graph)
    return importance

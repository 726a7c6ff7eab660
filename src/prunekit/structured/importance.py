"""Importance criteria for structured groups, as config objects usable wherever `Structured.importance` is.

    pk.Structured(ratio=0.5, importance=Taylor(data=batches))           # first-order Taylor, |w * dL/dw|
    pk.Structured(ratio=0.5, importance=Activation(data=batches, kind="apoz"))
    pk.Structured(ratio=0.5, importance=BNScale())                       # network slimming
    pk.Structured(ratio=0.5, importance=Magnitude(p=1, agg="max", norm=None))

Every criterion is two layers:

* a *pure function* from per-member channel values to per-unit scores (`combine`, `bn_scale_scores`,
  `apoz_to_importance`, ...), unit-tested on hand-computed cases;
* a *callable config* `(group, tensors) -> scores` that gathers what the function needs. Data-aware
  criteria (Taylor, Activation) need the model: `prepare(model, graph)` runs the calibration batches once
  (gradients or forward hooks) and caches per-tensor channel values, keyed by tensor *name*, so a graph that
  is re-traced (structured pruning re-traces when it auto-ignores modules) still finds them.

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
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from prunekit.batch import _bar, call_model, split_batch
from prunekit.config import Config, check_type, config_from_dict, register_config
from prunekit.errors import ConfigError
from prunekit.objective import _calibration_batches, batch_loss
from prunekit.structured import criteria as S

AGGS = ("sum", "mean", "max")
NORMS = ("mean", "max", "sum", None)
ACTIVATION_KINDS = ("mean", "apoz")

ChannelValues = Dict[Tuple[str, int], torch.Tensor]     # (tensor name, dim) -> one value per channel


# --------------------------------------------------------------------------------------------- pure functions


def aggregate(per_member: Sequence[torch.Tensor], agg: str = "sum") -> torch.Tensor:
    """Combine per-member unit scores (each (n_units,)) into one score per unit: sum, mean or max."""
    if not per_member:
        raise ConfigError("aggregate(): no member scores to combine")
    stacked = torch.stack([s.double() for s in per_member])
    if agg == "sum":
        return stacked.sum(0)
    if agg == "mean":
        return stacked.mean(0)
    if agg == "max":
        return stacked.max(0).values
    raise ConfigError(f"aggregate(): agg must be one of {AGGS}, got {agg!r}")


def combine(group, channel_values: ChannelValues, agg: str = "sum", norm: Optional[str] = "mean",
            reduce: str = "sum") -> torch.Tensor:
    """Per-unit scores of `group` from per-channel values of its members.

    Each member (tensor name, dim) found in `channel_values` is reduced to units (`reduce` over the unit's
    positions, e.g. the head_dim channels of one attention head), normalized per member (`norm`), then all
    members are combined with `agg`. Members without values (buffers, tensors the criterion does not see)
    are skipped; a group with none raises ValueError naming it."""
    per = []
    for m in group.members:
        v = channel_values.get((m.name, m.dim))
        if v is None:
            continue
        per.append(S.normalize(S.to_units(v.reshape(-1), m.pos, m.unit, group.n_units, reduce), norm))
    if not per:
        raise ConfigError(f"no scored tensor in {group.describe()}; this criterion cannot rank it")
    return aggregate(per, agg)


def magnitude_channel_values(group, tensors: Dict[str, torch.Tensor], p: int = 2) -> ChannelValues:
    """(name, dim) -> sum |w|^p of every slice along dim, for the parameter members of `group`."""
    return {(m.name, m.dim): S.channel_norms(tensors[m.name], m.dim, p)
            for m in group.members if not m.is_buffer and m.name in tensors}


def bn_scale_scores(group, tensors: Dict[str, torch.Tensor], bn_weights: Iterable[str], agg: str = "sum",
                    norm: Optional[str] = None) -> Optional[torch.Tensor]:
    """Network slimming (Liu et al. 2017): |gamma| of the BatchNorms on the group's channels.

    `bn_weights` are the names of BatchNorm weight tensors in the model. Returns None if the group has no
    BatchNorm (the caller decides on a fallback)."""
    bn = set(bn_weights)
    vals = {(m.name, m.dim): S.bn_scale(tensors[m.name]) for m in group.members if m.name in bn and m.dim == 0}
    if not vals:
        return None
    return combine(group, vals, agg=agg, norm=norm)


def apoz_to_importance(apoz: torch.Tensor) -> torch.Tensor:
    """APoZ (Hu et al. 2016) is the fraction of zero (<= 0 before ReLU) activations of a channel: a channel
    that is almost always zero carries little. Importance = 1 - APoZ, so higher still means keep."""
    return 1.0 - apoz.double()


def channel_dim(module: nn.Module, out: torch.Tensor) -> int:
    """Which dim of a producer module's output holds its channels: dim 1 for conv/batch-norm style modules
    on (B, C, ...) tensors, the last dim for linear/layer-norm/embedding style modules."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                           nn.modules.instancenorm._InstanceNorm)) and out.dim() >= 2:
        return 1
    return out.dim() - 1


def activation_stats(out: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(sum |a|, count of a <= 0, number of values) per channel of one output tensor along `dim`."""
    a = out.detach().float().movedim(dim, -1).reshape(-1, out.shape[dim])
    return a.abs().sum(0).double(), (a <= 0).sum(0).double(), a.shape[0]


def accumulate_taylor(model: nn.Module, batches: list, wanted: Iterable[Tuple[str, int]],
                      loss_fn: Optional[Callable] = None, quiet: bool = True) -> ChannelValues:
    """Sum over batches of |sum over each channel slice of w * dL/dw| for every (param name, dim) wanted.

    Runs in eval mode (BatchNorm uses and keeps its running statistics: calibration must not change the
    model) with gradients on; parameter .grad fields are restored to what they were."""
    params = dict(model.named_parameters())
    wanted = [(n, d) for n, d in dict.fromkeys(wanted) if n in params]
    saved = {n: p.grad for n, p in params.items()}
    req = {n: p.requires_grad for n, p in params.items()}
    acc: ChannelValues = {}
    was = model.training
    model.eval()
    try:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(True)
        for b in _bar(batches, "taylor calibration", quiet):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = batch_loss(model, b, loss_fn)
                if not torch.isfinite(loss):
                    raise ConfigError(f"Taylor importance: the calibration loss is {float(loss)}; check the data")
                loss.backward()
            for n, d in wanted:
                g = params[n].grad
                if g is None:
                    continue
                v = S.taylor(params[n], g, d).double()
                acc[(n, d)] = acc[(n, d)] + v if (n, d) in acc else v
    finally:
        model.train(was)
        for n, p in params.items():
            p.grad = saved[n]
            p.requires_grad_(req[n])
    return acc


def _run_hooked(model: nn.Module, batches: list, hooks: list, desc: str, quiet: bool) -> None:
    """Run the calibration batches in eval mode without gradients so `hooks` see them; always remove the
    hooks and restore the training mode."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in _bar(batches, desc, quiet):
                call_model(model, split_batch(b)[0])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()


def collect_activations(model: nn.Module, batches: list, modules: Iterable[str], quiet: bool = True
                        ) -> Dict[str, Dict[str, torch.Tensor]]:
    """{module name: {"mean_abs": per-channel mean |output|, "apoz": per-channel fraction of outputs <= 0}}
    from forward hooks, in eval mode without gradients."""
    sums: Dict[str, list] = {}
    hooks = []

    def hook_for(name):
        def hook(mod, args, out):
            if not isinstance(out, torch.Tensor):
                return
            s_abs, s_zero, n = activation_stats(out, channel_dim(mod, out))
            if name in sums:
                sums[name][0] += s_abs
                sums[name][1] += s_zero
                sums[name][2] += n
            else:
                sums[name] = [s_abs, s_zero, n]
        return hook

    mods = dict(model.named_modules())
    for name in dict.fromkeys(modules):
        if name in mods:
            hooks.append(mods[name].register_forward_hook(hook_for(name)))
    _run_hooked(model, batches, hooks, "activation calibration", quiet)
    return {k: {"mean_abs": a / n, "apoz": z / n} for k, (a, z, n) in sums.items()}


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

    def to_dict(self) -> dict:
        out = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            if f.name in self._runtime:
                continue
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Config) else v
        return out

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
        self._values = accumulate_taylor(model, _calibration_batches(self.data, self.batches), wanted,
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
        self._stats = collect_activations(model, _calibration_batches(self.data, self.batches), mods, self.quiet)

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


def fluctuation_values(var: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FLAP (An et al. 2024): a consumer's input channel j matters by how much it *varies*, weighted by the
    squared norm of the weight column that reads it: Var(X_j) * ||W[:, j]||^2. A channel that is nearly
    constant can be replaced by its mean, which bias compensation folds into the consumer's bias."""
    return var.float() * weight.detach().float().pow(2).sum(0)


def collect_input_moments(model: nn.Module, batches: list, modules: Iterable[str], quiet: bool = True
                          ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{module: (mean, variance)} of every input channel (last dim) of the named Linear modules."""
    acc: Dict[str, list] = {}
    hooks = []

    def hook_for(name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()       # (tokens, in_features)
            s = acc.setdefault(name, [0, torch.zeros(x.shape[1], dtype=torch.float64),
                                      torch.zeros(x.shape[1], dtype=torch.float64)])
            s[0] += x.shape[0]
            s[1] += x.sum(0)
            s[2] += x.pow(2).sum(0)
        return hook

    mods = dict(model.named_modules())
    for name in dict.fromkeys(modules):
        if isinstance(mods.get(name), nn.Linear):
            hooks.append(mods[name].register_forward_pre_hook(hook_for(name)))
    _run_hooked(model, batches, hooks, "fluctuation calibration", quiet)
    out = {}
    for k, (n, s1, s2) in acc.items():
        mean = s1 / max(n, 1)
        out[k] = (mean.float(), (s2 / max(n, 1) - mean.pow(2)).clamp_min(0).float())
    return out


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
        self._moments = collect_input_moments(model, _calibration_batches(self.data, self.batches), mods,
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

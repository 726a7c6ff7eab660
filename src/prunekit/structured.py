"""Structured pruning: score the groups of the dependency graph, decide keep-counts, cut, validate."""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from . import hf
from . import scores as S
from .api import PruneResult
from .config import Config, ConfigError, register_config, register_handler
from .graph.groups import DependencyGraph, Group
from .graph.tracer import GraphError
from .nn import MultiheadAttention, convert_mha
from .surgery import apply_kept, is_known_module


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


IMPORTANCES = ("l1", "l2", "random")


@register_config
@dataclasses.dataclass
class Structured(Config):
    """Remove whole channels / neurons / heads through the dependency graph.

    ratio:        fraction of each group's units to remove (float), or {module-name regex: ratio}; groups
                  whose modules match no pattern are left alone. Ignored when `target` is given.
    importance:   "l1" | "l2" | "random" | callable(group, tensors) -> (n_units,) scores (higher = keep).
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
    """
    ratio: Union[float, Dict[str, float]] = 0.5
    importance: Union[str, Callable] = "l2"
    global_ranking: bool = False
    round_to: int = 1
    ignore: Sequence[str] = ()
    max_ratio_per_layer: float = 0.9
    target: Optional[Config] = None
    seed: int = 0
    prune_hidden: Optional[bool] = None
    convert_mha: bool = True
    gqa: str = "groups"

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
        if self.gqa not in ("groups", "query_heads"):
            raise ConfigError(f"Structured.gqa must be 'groups' or 'query_heads', got {self.gqa!r}")
        if isinstance(self.ignore, str):
            self.ignore = [self.ignore]
        self.ignore = list(self.ignore)
        if self.target is not None and not isinstance(self.target, (MACs, Params)) and not hasattr(self.target, "speedup"):
            raise ConfigError(f"Structured.target must be pk.MACs(...), pk.Params(...) or pk.Latency(...), "
                              f"got {self.target!r}")


# ------------------------------------------------------------------------------------------- scoring

def group_scores(graph: DependencyGraph, cfg: Structured, tensors: Dict[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    out = {}
    if hasattr(cfg.importance, "prepare"):          # data-aware criteria (Taylor, activations) calibrate once
        cfg.importance.prepare(graph.model, graph)
    for g in graph.groups:
        if callable(cfg.importance):
            s = torch.as_tensor(cfg.importance(g, tensors), dtype=torch.float64).reshape(-1)
            if s.numel() != g.n_units:
                raise ValueError(f"importance callable returned {s.numel()} scores for {g.describe()} "
                                 f"(expected {g.n_units})")
        elif cfg.importance == "random":
            s = S.random_scores(g, gen)
        else:
            s = S.magnitude_group_scores(g, tensors, p=1 if cfg.importance == "l1" else 2)
        out[g.index] = s
    return out


# ------------------------------------------------------------------------------------------- allocation

def _group_ratio(g: Group, ratio) -> float:
    if not isinstance(ratio, dict):
        return float(ratio)
    found = []
    for pat, r in ratio.items():
        rx = re.compile(pat)
        if any(rx.fullmatch(m) or m.startswith(pat + ".") or m == pat for m in (g.producers or g.modules)):
            found.append(float(r))
    return min(found) if found else 0.0


def _min_keep(g: Group, round_to: int) -> int:
    """Fewest units a group may keep: at least one, and at least `round_to` channels."""
    return max(1, math.ceil(round_to / max(1, g.unit_size)))


def _round_keep(g: Group, keep: int, round_to: int) -> int:
    """Round a keep-count up so that kept channels are a multiple of `round_to` (when the group allows)."""
    if round_to <= 1:
        return keep
    step = round_to // math.gcd(round_to, g.unit_size)
    keep = int(math.ceil(keep / step) * step)
    return min(keep, g.n_units)


def allocate(graph: DependencyGraph, scores: Dict[int, torch.Tensor], cfg: Structured, ratio=None,
             warn: bool = True, skip=()) -> Dict[int, torch.Tensor]:
    """Decide which units each group loses. Returns {group index: bool mask of removed units}.

    skip: indices of groups that must keep all their units (e.g. a transformer's hidden size)."""
    ratio = cfg.ratio if ratio is None else ratio
    skip = set(skip)
    keep_n: Dict[int, int] = {}
    clamped = []
    if cfg.global_ranking and not isinstance(ratio, dict):
        entries = []
        for g in graph.groups:
            if g.index in skip:
                continue
            s = S.normalize(scores[g.index].clone())
            for u in range(g.n_units):
                entries.append((float(s[u]), g.index))
        entries.sort()
        total = len(entries)
        budget = int(math.floor(float(ratio) * total))
        removed_cnt = {g.index: 0 for g in graph.groups}
        cap = {}
        cap = {g.index: min(int(math.floor(cfg.max_ratio_per_layer * g.n_units)),
                            g.n_units - _min_keep(g, cfg.round_to)) for g in graph.groups}
        for s, gi in entries:
            if budget <= 0:
                break
            if removed_cnt[gi] < cap[gi]:
                removed_cnt[gi] += 1
                budget -= 1
        for g in graph.groups:
            keep_n[g.index] = g.n_units - removed_cnt[g.index]
    else:
        for g in graph.groups:
            r = 0.0 if g.index in skip else min(_group_ratio(g, ratio), cfg.max_ratio_per_layer)
            n_rm = int(math.floor(r * g.n_units + 1e-9))
            keep = g.n_units - n_rm
            mk = _min_keep(g, cfg.round_to)
            if keep < mk:
                if n_rm > 0:
                    clamped.append(g)
                keep = min(mk, g.n_units)
            keep_n[g.index] = keep
    removed = {}
    for g in graph.groups:
        if g.index in skip:
            continue
        keep = _round_keep(g, max(keep_n[g.index], min(_min_keep(g, cfg.round_to), g.n_units)), cfg.round_to)
        if keep >= g.n_units:
            continue
        order = torch.argsort(scores[g.index], descending=True, stable=True)
        mask = torch.ones(g.n_units, dtype=torch.bool)
        mask[order[:keep]] = False
        removed[g.index] = mask
    if clamped and warn:
        warnings.warn(f"{len(clamped)} group(s) would lose all their channels at this ratio; each keeps at least "
                      f"max(1, round_to) channels instead (first: {clamped[0].describe()})", stacklevel=3)
    return removed


def allocate_for_target(graph: DependencyGraph, scores, cfg: Structured, skip=()) -> Dict[int, torch.Tensor]:
    """Bisect the pruning ratio until the analytic MACs/params reach the target."""
    t = cfg.target
    if isinstance(t, MACs):
        measure, base = graph.macs, graph.macs()
    else:
        measure, base = graph.param_count, graph.param_count()
    goal = base * (1.0 - t.ratio)
    lo, hi = 0.0, cfg.max_ratio_per_layer
    best = allocate(graph, scores, cfg, ratio=0.0, warn=False, skip=skip)
    for _ in range(16):
        mid = (lo + hi) / 2
        rm = allocate(graph, scores, cfg, ratio=mid, warn=False, skip=skip)
        if measure(rm) > goal:
            lo = mid
        else:
            hi = mid
            best = rm
    if measure(best) > goal * 1.02:
        best = allocate(graph, scores, cfg, ratio=hi, warn=False, skip=skip)
    return best


# ------------------------------------------------------------------------------------------- handler

def _literal_attr_updates(graph: DependencyGraph, model: nn.Module, removed) -> List[List]:
    """Module attributes that hold a size used literally in a reshape (e.g. `num_heads`): old -> new."""
    flag = graph.removed_comps(removed)
    updates: Dict[tuple, int] = {}
    for rec in graph.trace.reshapes:
        if len(rec.sizes) != len(rec.out_blocks):
            continue
        for d, ids in enumerate(rec.out_blocks):
            if ids is None:
                continue
            old = ids.shape[0]
            ids = ids.numpy()
            alive = ~flag[graph.comp_of_id[np.where(ids >= 0, ids, 0)]] | (ids < 0)
            new = int(alive.any(1).sum())       # positions along the dim that keep any element
            if new == old or rec.sizes[d] != old:
                continue
            try:
                mod = model.get_submodule(rec.module) if rec.module else model
            except AttributeError:
                continue
            if is_known_module(mod):
                continue
            for attr, v in vars(mod).items():
                if attr.startswith("_") or isinstance(v, bool) or not isinstance(v, int) or v != old:
                    continue
                key = (rec.module, attr)
                if updates.get(key, new) != new:
                    raise GraphError(f"module '{rec.module}' attribute '{attr}'={old} would need two new values "
                                     f"({updates[key]} and {new}); pass ignore=['{rec.module}']")
                updates[key] = new
    out = [[m, a, v] for (m, a), v in sorted(updates.items())]
    for mod, attr, parts in graph.trace.split_attrs:      # split sizes kept in a module attribute
        new_sizes = []
        for p in parts:
            a = p.numpy()
            alive = ~flag[graph.comp_of_id[np.where(a >= 0, a, 0)]] | (a < 0)
            new_sizes.append(int(alive.any(1).sum()))
        out.append([mod, attr, new_sizes])
    return out


def _outputs(out):
    from torch.utils._pytree import tree_flatten
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def run_model(model, example_inputs):
    with torch.no_grad():
        if isinstance(example_inputs, dict):
            return model(**example_inputs)
        if isinstance(example_inputs, (tuple, list)):
            return model(*example_inputs)
        return model(example_inputs)


def remove_units(model: nn.Module, graph: DependencyGraph, removed: Dict[int, torch.Tensor]):
    """Lower-level API: cut exactly the given units ({group index: bool mask}) from a copy of `model`.

    Returns (pruned copy, kept indices, attribute updates). `model` is not modified."""
    kept = graph.kept_indices(removed)
    attrs = _literal_attr_updates(graph, model, removed)
    pruned = copy.deepcopy(model)
    apply_kept(pruned, kept, attrs)
    if hf.is_hf(pruned):
        hf.after_surgery(pruned, model.config)
    return pruned, kept, attrs


def _validate(pruned, example_inputs, base_out):
    """Run the pruned model; None if it works with unchanged output shapes, else (innermost module, error)."""
    stack = [""]
    names = {m: n for n, m in pruned.named_modules()}
    failed = []
    hooks = []
    def pre(mod, args):
        stack.append(names[mod])

    def post(mod, args, out):
        stack.pop()

    for m in pruned.modules():
        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    was = pruned.training
    pruned.eval()
    try:
        new_out = _outputs(run_model(pruned, example_inputs))
    except Exception as e:
        return stack[-1], f"{type(e).__name__}: {e}"
    finally:
        pruned.train(was)
        for h in hooks:
            h.remove()
    for a, b in zip(base_out, new_out):
        if a.shape != b.shape:
            return "", f"pruning changed an output shape {tuple(a.shape)} -> {tuple(b.shape)}"
    return None


@dataclasses.dataclass
class Cut:
    graph: DependencyGraph
    removed: Dict[int, torch.Tensor]
    pruned: nn.Module
    kept: Dict[str, Dict[int, List[int]]]
    attrs: List[List]
    ignore: List[str]
    auto_ignored: List[str]


def cut_valid(model: nn.Module, example_inputs, choose: Callable[[DependencyGraph], Dict[int, torch.Tensor]],
              ignore: Sequence[str] = (), graph: Optional[DependencyGraph] = None, attempts: int = 8,
              gqa: str = "groups") -> Cut:
    """Trace, let `choose(graph)` pick units to remove, cut a copy, and check the copy runs.

    When the cut copy fails inside some module (its code derives one size from another, e.g.
    `reshape(B, N, C)` with C the input width but the heads pruned), every module of that class is added to
    `ignore` and the cut is redone. `model` is never modified."""
    ignore = list(ignore)
    auto_ignored: List[str] = []
    for attempt in range(attempts):
        if graph is None or attempt > 0:
            was_training = model.training
            model.eval()
            try:
                graph = DependencyGraph(model, example_inputs, ignore=ignore, gqa=gqa)
            finally:
                model.train(was_training)
        removed = choose(graph)
        pruned, kept, attrs = remove_units(model, graph, removed)
        failure = _validate(pruned, example_inputs, _outputs(graph.trace.output))
        if failure is None:
            return Cut(graph, removed, pruned, kept, attrs, ignore, auto_ignored)
        mod_name, err = failure
        cls = type(model.get_submodule(mod_name)) if mod_name else None
        same = [n for n, m in model.named_modules() if cls is not None and type(m) is cls and n]
        new = [re.escape(n) for n in same if re.escape(n) not in ignore]
        if not new or cls in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
            raise GraphError(f"the pruned model fails to run in module '{mod_name or '<model>'}' ({err}). "
                             f"It probably computes a size from another one (e.g. head_dim = width // num_heads);"
                             f" pass ignore=['{mod_name}'] to leave it untouched.")
        ignore += new
        auto_ignored.append(f"{cls.__name__} ({len(new)} modules): {err}")
        warnings.warn(f"pruning {cls.__name__} modules breaks their forward ({err}); leaving all "
                      f"{len(new)} of them untouched (as if ignore= named them) and pruning the rest", stacklevel=3)
    raise GraphError(f"could not find a valid pruning after {attempts} attempts; pass ignore= for: {auto_ignored}")


@register_handler(Structured)
def prune_structured(model: nn.Module, cfg: Structured, *, example_inputs=None, inplace: bool = False,
                     graph: Optional[DependencyGraph] = None, **_) -> PruneResult:
    if example_inputs is None:
        raise ValueError("prune(model, Structured(...)) needs example_inputs=: a tensor, tuple or dict of "
                         "forward arguments to trace the model with (e.g. torch.randn(1, 3, 224, 224))")
    t0 = time.perf_counter()
    info: Dict[str, Any] = {}
    original = model
    converted: List[str] = []
    cuts_something = cfg.target is not None or (any(v > 0 for v in cfg.ratio.values()) if isinstance(cfg.ratio, dict)
                                                 else cfg.ratio > 0)
    if cfg.convert_mha and graph is None and cuts_something and any(
            MultiheadAttention.convertible(m) for m in model.modules()):
        model = model if inplace else copy.deepcopy(model)
        converted = convert_mha(model)

    hf_model = hf.is_hf(model)
    prune_hidden = (not hf_model) if cfg.prune_hidden is None else cfg.prune_hidden

    def choose(g: DependencyGraph):
        info["t_graph"] = time.perf_counter() - t0
        sc = group_scores(g, cfg, {**g.params, **g.buffers})
        skip = () if prune_hidden else hf.hidden_group_indices(g, model)
        if cfg.target is not None and hasattr(cfg.target, "speedup"):
            from .latency import allocate_for_latency
            rm, lat = allocate_for_latency(model, g, sc, cfg, example_inputs)
            info["lat"] = lat
            return {k: v for k, v in rm.items() if k not in skip}
        if cfg.target is not None:
            return allocate_for_target(g, sc, cfg, skip=skip)
        return allocate(g, sc, cfg, skip=skip)

    cut = cut_valid(model, example_inputs, choose, ignore=cfg.ignore, graph=graph, gqa=cfg.gqa)
    graph, removed, pruned, kept, attrs = cut.graph, cut.removed, cut.pruned, cut.kept, cut.attrs
    ignore, auto_ignored, lat_info, t_graph = cut.ignore, cut.auto_ignored, info.get("lat"), info["t_graph"]
    t_alloc = t_graph
    macs_before, params_before = graph.macs(), sum(p.numel() for p in original.parameters())
    macs_after = graph.macs(removed)
    added_bias: List[str] = []
    if hasattr(cfg.importance, "compensate"):       # FLAP-style bias compensation for the removed channels
        added_bias = cfg.importance.compensate(model, pruned, kept)
    base_config = model.config if hf_model else None
    if inplace:
        apply_kept(model, kept, attrs)
        if hf_model:
            hf.after_surgery(model, base_config)
        for name in added_bias:
            lin = model.get_submodule(name)
            lin.bias = nn.Parameter(torch.zeros_like(pruned.get_submodule(name).bias))
        model.load_state_dict(pruned.state_dict())   # the validated copy may carry compensated biases
        pruned = model
    t_surgery = time.perf_counter() - t0
    plan = {
        "format": "prunekit.structured/1",
        "config": _safe_dict(cfg),
        "kept": {n: {str(d): v for d, v in dims.items()} for n, dims in kept.items()},
        "attrs": attrs,
        **({"convert_mha": converted} if converted else {}),
        **({"add_bias": added_bias} if added_bias else {}),
        **({"hf_base_config": base_config.to_dict(), "hf_class": type(model).__name__, "hf_config_exact": hf._shapes_match(pruned, pruned.config) and not added_bias}
           if hf_model else {}),
        "groups": [{"index": g.index, "units": g.n_units, "unit_size": g.unit_size,
                    "kept": int(g.n_units - int(removed[g.index].sum())) if g.index in removed else g.n_units,
                    "modules": g.modules[:8]} for g in graph.groups],
    }
    stats = {"params_before": params_before, "params_after": sum(p.numel() for p in pruned.parameters()),
             "macs_before": macs_before, "macs_after": macs_after, "groups": len(graph.groups),
             "groups_pruned": len(removed), "time_graph_s": t_graph, "time_alloc_s": t_alloc - t_graph,
             "time_total_s": t_surgery, "auto_ignored": auto_ignored,
             "ignore": ignore}
    if lat_info:
        stats.update(lat_info)
    return PruneResult(model=pruned, plan=plan, config=cfg, stats=stats)


def _safe_dict(cfg):
    try:
        return cfg.to_dict()
    except ConfigError:
        d = {"type": type(cfg).__name__}
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            d[f.name] = repr(v) if callable(v) else (v.to_dict() if isinstance(v, Config) else v)
        return d

"""Structured pruning: score the groups of the dependency graph, decide keep-counts, cut, validate."""
from __future__ import annotations

import copy
import dataclasses
import re
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from prunekit.api import PruneResult
from prunekit.batch import check_example_inputs
from prunekit.config import register_handler
from prunekit.errors import ConfigError
from prunekit.graph.groups import DependencyGraph
from prunekit.measure.counts import count_params
from prunekit.models import hf
from prunekit.nn import MultiheadAttention, convert_mha
from prunekit.plan import Plan
from prunekit.structured.allocate import allocate, allocate_for_target, group_scores
from prunekit.structured.config import Latency, Structured, check_patterns_match
from prunekit.structured.cut import cut_valid
from prunekit.structured.importance import Taylor
from prunekit.structured.latency import allocate_for_latency
from prunekit.structured.shapes import tie_hidden_to_heads
from prunekit.structured.surgery import apply_kept


@register_handler(Structured)
def prune_structured(model: nn.Module, cfg: Structured, *, example_inputs=None, inplace: bool = False,
                     graph: Optional[DependencyGraph] = None, data=None, verify: Optional[bool] = None
                     ) -> PruneResult:
    if example_inputs is None:
        raise ConfigError("prune(model, Structured(...)) needs example_inputs=: a tensor, tuple or dict of "
                          "forward arguments to trace the model with (e.g. torch.randn(1, 3, 224, 224))")
    if graph is None:
        check_example_inputs(model, example_inputs)
    check_patterns_match(cfg, [n for n, _ in model.named_modules()],
                         [n for n, _ in (*model.named_parameters(), *model.named_buffers())])
    t0 = time.perf_counter()
    info: Dict[str, Any] = {}
    original = model
    converted: List[str] = []
    cuts_something = cfg.target is not None or (any(v > 0 for v in cfg.ratio.values()) if isinstance(cfg.ratio, dict)
                                                 else cfg.ratio > 0)
    cfg, warning = resolve_auto_importance(model, cfg, data) if cuts_something else (cfg, None)
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
        if isinstance(cfg.target, Latency):
            rm, lat = allocate_for_latency(model, g, sc, cfg, example_inputs)
            info["lat"] = lat
            return {k: v for k, v in rm.items() if k not in skip}
        rm = allocate_for_target(g, sc, cfg, skip=skip) if cfg.target is not None else allocate(g, sc, cfg, skip=skip)
        if cfg.uniform and hf_model and cfg.prune_hidden is not False:     # hidden / heads stays the head size
            rm = tie_hidden_to_heads(model, g, sc, rm)
        return rm

    verify = cfg.verify if verify is None else bool(verify)
    cut = cut_valid(model, example_inputs, choose, ignore=cfg.ignore, graph=graph, gqa=cfg.gqa, verify=verify)
    graph, removed, pruned, kept, attrs = cut.graph, cut.removed, cut.pruned, cut.kept, cut.attrs
    ignore, auto_ignored, lat_info, t_graph = cut.ignore, cut.auto_ignored, info.get("lat"), info["t_graph"]
    t_alloc = t_graph
    macs_before, params_before = graph.macs(), count_params(original)
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
    plan = Plan(
        kind="structured", config=cfg.to_dict(callables="repr"),
        kept={n: {str(d): v for d, v in dims.items()} for n, dims in kept.items()}, attrs=[list(a) for a in attrs],
        convert_mha=converted, add_bias=added_bias,
        groups=[{"index": g.index, "units": g.n_units, "unit_size": g.unit_size,
                 "kept": int(g.n_units - int(removed[g.index].sum())) if g.index in removed else g.n_units,
                 "modules": g.modules[:8]} for g in graph.groups])
    if hf_model:
        plan.hf_base_config, plan.hf_class = base_config.to_dict(), type(model).__name__
        plan.hf_config_exact = hf.config_valid(pruned.config, pruned) and not added_bias
    stats = {"params_before": params_before, "params_after": count_params(pruned),
             "macs_before": macs_before, "macs_after": macs_after, "groups": len(graph.groups),
             "groups_pruned": len(removed), "time_graph_s": t_graph, "time_alloc_s": t_alloc - t_graph,
             "time_total_s": t_surgery, "auto_ignored": auto_ignored,
             "ignore": ignore, "verification": cut.verification.to_dict()}
    if lat_info:
        stats.update(lat_info)
    stats["pinned_by"] = pinned_by(graph)
    empty = nothing_cut(cfg, removed, stats["pinned_by"], cuts_something)
    if empty:
        warnings.warn(empty, stacklevel=3)
    stats["warnings"] = [w for w in (warning, empty) if w]
    if not stats["warnings"]:
        del stats["warnings"]
    return PruneResult(model=pruned, plan=plan, config=cfg, stats=stats)


def pinned_by(graph: DependencyGraph, top: int = 5) -> List[str]:
    """The ops that pinned the most channels (kept them whole), largest first, repeats across blocks folded
    into one entry ('layers.#.mixer')."""
    folded: Dict[str, int] = {}
    for site, n in graph.trace.space.pin_sites.items():
        key = re.sub(r"\.\d+(?=\.|')", ".#", site)
        folded[key] = folded.get(key, 0) + n
    return [k for k, _ in sorted(folded.items(), key=lambda kv: -kv[1])[:top]]


def nothing_cut(cfg: Structured, removed, pinned: List[str], asked: bool) -> Optional[str]:
    """A warning when a non-zero ratio or a target cut nothing at all, saying what kept the channels."""
    if removed or not asked:
        return None
    why = (f"the channels are pinned (kept whole) by {'; '.join(pinned[:3])}: these ops read channels by position "
           f"or with sizes prunekit cannot rewrite" if pinned else "the model has no channel group prunekit may cut "
           f"(every width feeds the model's outputs or an ignored module)")
    return (f"Structured({cfg.ratio if cfg.target is None else cfg.target!r}) removed nothing: {why}. The model is "
            f"unchanged; prune another granularity (pk.Layers for whole blocks, pk.Sparse for weights) or report "
            f"the op above")


def is_causal_lm(model: nn.Module) -> bool:
    return hf.is_hf(model) and type(model).__name__.endswith("ForCausalLM")


def _with_labels(batch):
    """A calibration batch as forward kwargs whose LM loss Taylor can differentiate (labels = input_ids)."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch, "labels": batch}
    if isinstance(batch, dict) and "input_ids" in batch:
        return {"labels": batch["input_ids"], **batch}
    raise ConfigError(f"prune(..., data=...): a causal-LM calibration batch must be an input_ids tensor or a dict "
                      f"with 'input_ids', got {type(batch).__name__}")


def resolve_auto_importance(model: nn.Module, cfg: Structured, data):
    """(config, warning): importance="auto" becomes Taylor on the LM loss for a causal LM given data; without
    data it stays L2 magnitude and the warning says why that is bad for an LLM and how to pass data."""
    if cfg.importance != "auto" or not is_causal_lm(model):
        return cfg, None
    if data is None:
        msg = (f"prune({type(model).__name__}, Structured()): no calibration data, so heads and FFN neurons are "
               f"scored by weight magnitude, which wrecks LLM widths (SmolLM2-135M: perplexity ~4e5 instead of "
               f"~90). Pass data=[input_ids tensors] to pk.prune to score by Taylor on the LM loss.")
        warnings.warn(msg, UserWarning, stacklevel=4)
        return cfg, msg
    batches = [_with_labels(b) for b in data]
    return dataclasses.replace(cfg, importance=Taylor(data=batches, batches=len(batches))), None

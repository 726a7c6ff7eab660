"""Mixture-of-experts pruning: whole experts and per-expert FFN width (`pk.Experts`).

Why a config of its own rather than an option of `Structured`: an expert is not a channel of the dependency
graph. Which expert a token uses is decided at run time by the router's top-k, so the trace of one example sees
only the experts that example happened to hit, and the right score is a routing statistic, not a weight norm.
The block structure (router rows <-> stacked expert tensors) is found directly (models/moe.py) and the cut is
expressed as an ordinary structured plan (`kept` + `attrs`), so `pk.save` / `pk.load` / `from_pretrained`
work as for any structured prune.

Scores, from the calibration `data` (REAP-style routing statistics):
    expert e   mean over tokens of the router weight e gets when it is in the token's top-k
               (= routing frequency x mean gate weight); the lowest `ratio` of experts of every block go.
    neuron j   of expert e: ||activation_j|| over the tokens routed to e times the norm of its down-projection
               column (Wanda's |W| * ||x|| on the output side); experts no token reached use weight norms.

Removing experts leaves `top_k` unchanged unless fewer experts remain (then top_k = experts left). Width
pruning is checked exactly: the cut model must equal the dense one with the removed neurons zeroed.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List

import torch
import torch.nn as nn

from prunekit.api import PruneResult
from prunekit.batch import as_batches, call_batch
from prunekit.config import Config, register_config, register_handler
from prunekit.errors import CalibrationDataError, ConfigError, GraphError
from prunekit.measure.counts import count_params
from prunekit.models import hf
from prunekit.models.moe import MoEBlock, RoutingStats, find_moe_blocks, moe_attr_updates, routing_stats, stacked_param
from prunekit.plan import Plan
from prunekit.structured.surgery import apply_kept


@register_config
@dataclasses.dataclass
class Experts(Config):
    """Remove `ratio` of the experts of every MoE block and `width` of every remaining expert's FFN neurons."""
    ratio: float = 0.25
    width: float = 0.0

    def __post_init__(self):
        for name in ("ratio", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"Experts.{name} must be a number in [0, 1), got {v!r}")


def _neuron_scores(b: MoEBlock, st: RoutingStats) -> torch.Tensor:
    """(E, I): activation norm x down-projection column norm; weight norms where no token was routed."""
    weight_norm = torch.ones(b.n_experts, b.width, dtype=torch.float64)
    out_norm = torch.ones_like(weight_norm)
    for w in b.weights:
        p = stacked_param(b, w).detach().double()
        other = 3 - w.neuron_dim
        norms = p.pow(2).sum(other).sqrt()                       # (E, I) or (E, 2I)
        if w.fused:
            norms = norms[:, :b.width] * norms[:, b.width:]
            weight_norm *= norms
        else:
            out_norm *= norms
            weight_norm *= norms
    data = st.h_sq.sqrt() * out_norm
    return torch.where((st.h_sq > 0).any(1, keepdim=True), data, weight_norm)


def _calibrate(model, blocks, data) -> List[RoutingStats]:
    stats = routing_stats(model, blocks, data)
    if not any(s.tokens for s in stats):
        raise CalibrationDataError("Experts: no token reached any MoE block on data=; pass calibration batches "
                                   "the model runs on (e.g. input_ids tensors)")
    return stats


def _plan_block(b: MoEBlock, st: RoutingStats, cfg: Experts):
    """(kept, attrs) entries of one block."""
    n_keep = max(1, b.n_experts - int(round(cfg.ratio * b.n_experts)))
    score = st.gate / max(st.tokens, 1)
    keep = sorted(torch.argsort(score, descending=True, stable=True)[:n_keep].tolist())
    w_keep = max(1, b.width - int(round(cfg.width * b.width)))
    neurons = _neuron_scores(b, st)[keep]
    per = [sorted(torch.argsort(r, descending=True, stable=True)[:w_keep].tolist()) for r in neurons]
    kept: Dict[str, Dict[int, list]] = {}
    router_params = dict(b.router.named_parameters())
    if n_keep < b.n_experts:
        for pn, p in router_params.items():
            if p.shape[0] == b.n_experts:
                kept[f"{b.router_name}.{pn}"] = {0: keep}
    for w in b.weights:
        spec: Dict[int, list] = {0: keep} if n_keep < b.n_experts else {}
        if w_keep < b.width:
            spec[w.neuron_dim] = [r + [b.width + i for i in r] for r in per] if w.fused else per
        if spec:
            kept[w.name] = spec
    top_k = b.top_k
    new_k = min(top_k, n_keep) if top_k else None
    return kept, moe_attr_updates(b, n_keep, new_k, w_keep), score.tolist()


def _zero_removed_neurons(model, kept_neurons):
    """The dense model with the pruned neurons zeroed (what the width cut must reproduce)."""
    z = copy.deepcopy(model)
    params = dict(z.named_parameters())
    with torch.no_grad():
        for name, (dim, rows) in kept_neurons.items():
            p = params[name]
            for e, r in enumerate(rows):
                mask = torch.ones(p.shape[dim], dtype=torch.bool)
                mask[r] = False
                p[e].index_fill_(dim - 1, torch.nonzero(mask).flatten(), 0.0)
    return z


def _check_width(model, pruned, kept, blocks, cfg, data):
    """Width-only cut vs the dense model with those neurons zeroed, on the first calibration batch."""
    if cfg.width == 0 or cfg.ratio > 0:
        return
    spec = {}
    for b in blocks:
        for w in b.weights:
            k = kept.get(w.name, {}).get(w.neuron_dim)
            if k is not None:
                spec[w.name] = (w.neuron_dim, k)
    ref = _zero_removed_neurons(model, spec)
    with torch.no_grad():
        dev = next(pruned.parameters()).device
        a, b_ = call_batch(pruned.eval(), data[0], dev), call_batch(ref.eval(), data[0], dev)
    a = a.logits if hasattr(a, "logits") else a
    b_ = b_.logits if hasattr(b_, "logits") else b_
    err = float((a - b_).abs().max() / b_.abs().max().clamp_min(1e-6))
    if err > 1e-4:
        raise GraphError(f"Experts: the width-pruned model differs from the dense model with those neurons zeroed "
                         f"(relative error {err:.2g}); the expert layout of '{blocks[0].experts_name}' is not the "
                         f"gate|up chunk layout prunekit assumes; use width=0")


@register_handler(Experts)
def prune_experts(model: nn.Module, cfg: Experts, *, data=None, inplace: bool = False) -> PruneResult:
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ConfigError(f"pk.Experts: {type(model).__name__} has no mixture-of-experts block (a module with a "
                          f"router `gate`/`router` of shape (experts, hidden) and an `experts` module holding "
                          f"stacked (experts, ...) weights); use pk.Structured for dense models")
    if data is None:
        raise CalibrationDataError("pk.prune(model, Experts(...)) needs data=: calibration batches (input_ids "
                                   "tensors or dicts of forward arguments); expert scores are routing statistics")
    data = as_batches(data, what="Experts data", model=model)
    stats = _calibrate(model, blocks, data)
    kept, attrs, scores = {}, [], {}
    for b, st in zip(blocks, stats):
        k, a, s = _plan_block(b, st, cfg)
        kept.update(k)
        attrs += a
        scores[b.name] = s
    base_config = model.config if hf.is_hf(model) else None
    out = model if inplace else copy.deepcopy(model)
    params_before = count_params(model)
    apply_kept(out, kept, attrs)
    exact = hf.after_surgery(out, base_config) if base_config is not None else False
    _check_width(model, out, kept, blocks, cfg, data)
    plan = Plan(kind="structured", config=cfg.to_dict(),
                kept={n: {str(d): v for d, v in dims.items()} for n, dims in kept.items()}, attrs=[list(x) for x in attrs])
    if base_config is not None:
        plan.hf_base_config, plan.hf_class, plan.hf_config_exact = base_config.to_dict(), type(model).__name__, exact
    return PruneResult(model=out, plan=plan, config=cfg,
                       stats={"params_before": params_before, "params_after": count_params(out),
                              "expert_scores": scores, "tokens": [s.tokens for s in stats]})

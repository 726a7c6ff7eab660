"""Mixture-of-experts blocks: where the router and the stacked expert weights are, and their sizes.

A block is found by structure, not by family: a module with a router child (`gate` / `router`) holding a
2-D `weight` of shape (experts, hidden) and an `experts` child holding 3-D parameters whose first dim is the
number of experts (transformers 5 stores every expert of a layer in one (E, out, in) or (E, in, out) tensor and
runs them either in an eager loop or with one grouped matmul). For each 3-D parameter the dim that is not the
hidden size holds the expert's FFN neurons; a fused gate/up tensor holds them twice (gate half, then up half:
the `chunk(2)` layout).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from prunekit.batch import call_batch, eval_mode
from prunekit.errors import GraphError

ROUTER_NAMES = ("gate", "router")
EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_ATTRS = ("top_k", "num_experts_per_tok")
WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "moe_intermediate_size")
# config fields, first stored one wins
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_top_k", "top_k")
EXPERT_WIDTH_FIELDS = ("moe_intermediate_size", "intermediate_size")


@dataclass
class ExpertWeight:
    name: str            # parameter name inside the model
    neuron_dim: int      # 1 or 2: the dim holding the FFN neurons
    fused: bool          # gate and up halves stacked along neuron_dim
    reads_hidden: bool = True   # gate/up (input: the hidden state) vs down (input: the neurons)


@dataclass
class MoEBlock:
    name: str
    block: nn.Module
    router_name: str
    router: nn.Module
    experts_name: str
    experts: nn.Module
    n_experts: int
    width: int                       # FFN neurons per expert
    weights: List[ExpertWeight] = field(default_factory=list)

    @property
    def top_k(self) -> Optional[int]:
        for mod in (self.router, self.block, self.experts):
            for a in TOP_K_ATTRS:
                v = getattr(mod, a, None)
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
        return None


def _router(mod: nn.Module):
    for rn in ROUTER_NAMES:
        r = getattr(mod, rn, None)
        w = getattr(r, "weight", None)
        if isinstance(r, nn.Module) and w is not None and getattr(w, "dim", lambda: 0)() == 2:
            return rn, r
    return None, None


def find_moe_blocks(model: nn.Module) -> List[MoEBlock]:
    out = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        rn, router = _router(mod)
        if router is None or not isinstance(experts, nn.Module):
            continue
        n_exp, hidden = router.weight.shape
        stacked = [(pn, p) for pn, p in experts.named_parameters() if p.dim() == 3 and p.shape[0] == n_exp]
        if not stacked:
            continue
        prefix = f"{name}." if name else ""
        weights, widths = [], []
        for pn, p in stacked:
            other = [d for d in (1, 2) if p.shape[d] != hidden]
            if not other:           # square (width == hidden): the name and the layout flag decide
                out_side = any(k in pn for k in ("down", "w2", "out"))
                other = [2 if out_side != bool(getattr(experts, "is_transposed", False)) else 1]
            if len(other) != 1:
                continue
            d = other[0]
            widths.append(p.shape[d])
            weights.append(ExpertWeight(f"{prefix}experts.{pn}", d, False,
                                        not any(k in pn for k in ("down", "w2", "out"))))
        if not widths:
            continue
        width = min(widths)
        for w, n in zip(weights, widths):
            w.fused = n == 2 * width
        out.append(MoEBlock(name, mod, f"{prefix}{rn}", router, f"{prefix}experts", experts, n_exp, width, weights))
    return out


def moe_sizes(model: nn.Module, names: Optional[set] = None) -> Dict[str, List[int]]:
    """Per-block expert counts, top-k and expert widths read from the weights (blocks in `names`, or all)."""
    blocks = [b for b in find_moe_blocks(model) if names is None or b.name in names]
    return {"experts": [b.n_experts for b in blocks], "top_k": [b.top_k for b in blocks if b.top_k],
            "expert_ffn": [b.width for b in blocks]}


def moe_attr_updates(b: MoEBlock, n_experts: int, top_k: Optional[int], width: int) -> List[list]:
    """[module, attribute, new value] for every size attribute of the block that holds an old size."""
    old = {EXPERT_COUNT_ATTRS: b.n_experts, TOP_K_ATTRS: b.top_k, WIDTH_ATTRS: b.width}
    new = {EXPERT_COUNT_ATTRS: n_experts, TOP_K_ATTRS: top_k, WIDTH_ATTRS: width}
    out = []
    for mname, mod in ((b.name, b.block), (b.router_name, b.router), (b.experts_name, b.experts)):
        for attrs, before in old.items():
            for a in attrs:
                v = getattr(mod, a, None)
                if before is not None and isinstance(v, int) and not isinstance(v, bool) and v == before \
                        and new[attrs] != before:
                    out.append([mname, a, new[attrs]])
    return out


def stacked_param(b: MoEBlock, w: ExpertWeight) -> nn.Parameter:
    return dict(b.experts.named_parameters())[w.name.rpartition(".")[2]]


def expert_matrix(b: MoEBlock, w: ExpertWeight, e: int):
    """Expert e's slice of a stacked weight as (out features, in features), a view of the parameter."""
    p = stacked_param(b, w)[e]
    out_dim = w.neuron_dim if w.reads_hidden else 3 - w.neuron_dim      # 1 or 2 in the stacked tensor
    return p if out_dim == 1 else p.t()


def _gate_up(b: MoEBlock):
    """The fused (E, 2I, hidden) gate/up tensor the activation statistics need, or None for other layouts."""
    for w in b.weights:
        if w.fused and w.neuron_dim == 1:
            return stacked_param(b, w).detach()
    return None


class RoutingStats:
    """What calibration tokens did in one block: summed top-k router weight per expert (`gate`), tokens seen,
    and per expert the squared norms of the inputs of its gate/up projection (`x_sq`, (E, hidden)) and of its
    down projection (`h_sq`, (E, I)), plus their Gram matrices when `hessian` (SparseGPT)."""

    def __init__(self, b: MoEBlock, hessian: bool = False):
        self.b, self.tokens, self.hessian = b, 0, hessian
        hidden = b.router.weight.shape[1]
        self.gate = torch.zeros(b.n_experts, dtype=torch.float64)
        self.x_sq = torch.zeros(b.n_experts, hidden, dtype=torch.float64)
        self.h_sq = torch.zeros(b.n_experts, b.width, dtype=torch.float64)
        self.x_gram = torch.zeros(b.n_experts, hidden, hidden) if hessian else None
        self.h_gram = torch.zeros(b.n_experts, b.width, b.width) if hessian else None
        self.rows = torch.zeros(b.n_experts, dtype=torch.long)

    def hook(self, mod, args):
        if len(args) < 3 or not all(isinstance(a, torch.Tensor) for a in args[:3]):
            raise GraphError(f"'{self.b.experts_name}' is not called as experts(hidden, top_k_index, top_k_weights),"
                             f" so routing cannot be observed; pass ignore=[r'{self.b.experts_name}'] to skip it")
        x, idx, w = args[0].detach(), args[1].detach(), args[2].detach().double()
        self.tokens += idx.shape[0]
        self.gate.index_add_(0, idx.reshape(-1).long(), w.reshape(-1))
        gate_up = _gate_up(self.b)
        for e in torch.unique(idx).tolist():
            if e >= self.b.n_experts:
                continue
            xe = x[(idx == e).any(-1)]
            self.rows[e] += xe.shape[0]
            self.x_sq[e] += xe.double().pow(2).sum(0)
            if self.hessian:
                self.x_gram[e] += (xe.t().float() @ xe.float())
            if gate_up is None:
                continue
            g, u = torch.nn.functional.linear(xe, gate_up[e]).chunk(2, dim=-1)
            h = getattr(mod, "act_fn", torch.nn.functional.silu)(g) * u
            self.h_sq[e] += h.double().pow(2).sum(0)
            if self.hessian:
                self.h_gram[e] += (h.t().float() @ h.float())


def routing_stats(model: nn.Module, blocks: List[MoEBlock], batches, hessian: bool = False) -> List[RoutingStats]:
    """Run the calibration batches (from batch.as_batches) and collect every block's routing statistics."""
    stats = [RoutingStats(b, hessian) for b in blocks]
    hooks = [s.b.experts.register_forward_pre_hook(s.hook) for s in stats]
    device = next(model.parameters()).device
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                call_batch(model, batch, device)
    finally:
        for h in hooks:
            h.remove()
    return stats

"""Sparsity for stacked mixture-of-experts weights: 3-D (experts, out, in) or (experts, in, out) parameters.

They are not modules, so the per-module path of `pk.Sparse` never sees them (Mixtral keeps ~90% of its
weights there). Each expert slice is pruned as its own (out, in) matrix with the same algorithms
(sparse/algorithms.py), on the inputs that expert really received: the tokens the router sent to it
(models/moe.py `routing_stats`), for the gate/up projection the hidden states, for the down projection the
gated activations. An expert no calibration token reached falls back to magnitude. The zeros are written into
the parameter (no parametrization: the tensor is not a module weight), so they are baked from the start.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch

from prunekit.models.moe import MoEBlock, expert_matrix, find_moe_blocks, routing_stats, stacked_param
from prunekit.sparse.algorithms import magnitude_mask, sparsegpt_prune, wanda_mask


def expert_targets(model, targets, ignore) -> List[MoEBlock]:
    """MoE blocks whose stacked weights the Sparse config selects (default: all; `targets`/`ignore` regexes
    are matched against the stacked parameter names, e.g. 'model.layers.0.mlp.experts.down_proj')."""
    out = []
    for b in find_moe_blocks(model):
        names = [w.name for w in b.weights]
        chosen = [n for n in names if targets is None or any(re.search(rx, n) for rx in targets)]
        if any(not any(re.search(rx, n) for rx in ignore) for n in chosen):
            out.append(b)
    return out


def _prune_matrix(W, method, sparsity, pattern, x_sq, gram, rows):
    if method == "magnitude" or rows == 0:
        return W * magnitude_mask(W, sparsity, pattern)
    if method == "wanda":
        return W * wanda_mask(W, x_sq.to(W.dtype), sparsity, pattern)
    H = (2.0 / rows) * gram.to(torch.float32)
    new, keep = sparsegpt_prune(W.float(), H, sparsity, pattern)
    return (new * keep).to(W.dtype)


@torch.no_grad()
def prune_expert_weights(model, blocks: List[MoEBlock], batches, method: str, sparsity: float,
                         pattern: str, targets, ignore) -> Dict[str, float]:
    """Prune every selected expert slice in place; returns {stacked parameter name: fraction of zeros}."""
    stats = routing_stats(model, blocks, batches or [], hessian=method == "sparsegpt") if method != "magnitude" \
        else [None] * len(blocks)
    out = {}
    for b, st in zip(blocks, stats):
        for w in b.weights:
            if (targets is not None and not any(re.search(rx, w.name) for rx in targets)) \
                    or any(re.search(rx, w.name) for rx in ignore):
                continue
            for e in range(b.n_experts):
                W = expert_matrix(b, w, e)
                x_sq = gram = None
                rows = int(st.rows[e]) if st is not None else 0
                if st is not None:
                    x_sq, gram = (st.x_sq[e], st.x_gram) if w.reads_hidden else (st.h_sq[e], st.h_gram)
                    gram = gram[e] if gram is not None else None
                    if not w.reads_hidden and not bool((st.h_sq[e] > 0).any()):
                        rows = 0                     # layout without observable activations: magnitude
                W.copy_(_prune_matrix(W.detach().clone(), method, sparsity, pattern, x_sq, gram, rows))
            p = stacked_param(b, w)
            out[w.name] = float((p == 0).float().mean())
    return out


def add_expert_counts(measured: dict, model, experts: Dict[str, float]) -> dict:
    """Fold the stacked expert weights into `sparsity_stats`' per-layer fractions and totals."""
    params = dict(model.named_parameters())
    for n, frac in experts.items():
        measured["layers"][n] = frac
        measured["zeros"] += int(round(frac * params[n].numel()))
        measured["params"] += params[n].numel()
    measured["total"] = measured["zeros"] / measured["params"] if measured["params"] else 0.0
    return measured

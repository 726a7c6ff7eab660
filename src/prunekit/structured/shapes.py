"""uniform=True for configs without an explicit head size.

BERT, GPT-2, OPT, Falcon, GPT-NeoX (any family whose attention computes head_dim = hidden_size / heads) cannot
say "12 heads of 64 at hidden 1024" in their config: fewer heads only reload with plain `from_pretrained`
when the residual stream (the hidden size) shrinks in proportion, so that hidden / heads is the old head size.
After the uniform allocation picked the kept heads, this ties each such tower's hidden-size group to them:
it keeps heads * head_dim channels, the highest-scored ones. Towers whose hidden size is not a prunable group
(an encoder whose outputs are its hidden states: BertModel, Dinov2Model, CLIPModel) keep it, with a warning
that only `pk.load` reloads the result.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Dict, List

import torch
import torch.nn as nn

from prunekit.graph.groups import DependencyGraph
from prunekit.models import hf


def _kept_fraction(graph: DependencyGraph, removed: Dict[int, torch.Tensor], pname: str, dim: int) -> float:
    """Fraction of the positions of parameter dim (pname, dim) that the removal masks keep."""
    total = kept = 0
    for g in graph.groups:
        for m in g.members:
            if m.name == pname and m.dim == dim:
                total += len(m.pos)
                kept += int((~removed[g.index][m.unit]).sum()) if g.index in removed else len(m.pos)
    return kept / total if total else 1.0


def _kept_heads(model: nn.Module, graph, removed) -> Dict[str, List]:
    """{config scope: [(dense heads, kept heads, head_dim)] per attention block}."""
    sizes = {name: (hd, h) for name, _, hd, h, _ in hf.attention_sizes(model, model.config)}
    out = defaultdict(list)
    scopes = hf.module_scopes(model)
    for name, _, (qn, q), _ in hf.attention_modules(model):
        if name not in sizes:
            continue
        hd, h = sizes[name]
        pname = f"{name}.{qn}.weight" if name else f"{qn}.weight"
        frac = _kept_fraction(graph, removed, pname, 0 if isinstance(q, nn.Linear) else 1)
        out[scopes.get(name, "")].append((h, int(round(h * frac)), hd))
    return out


def _hidden_groups_by_scope(graph, model: nn.Module) -> Dict[str, List[int]]:
    scopes = hf.module_scopes(model)
    out = defaultdict(list)
    by_index = {g.index: g for g in graph.groups}
    for gi in hf.hidden_group_indices(graph, model):
        found = {scopes.get(m.name.rpartition(".")[0], "") for m in by_index[gi].members}
        if len(found) == 1:
            out[found.pop()].append(gi)
    return out


def tie_hidden_to_heads(model: nn.Module, graph: DependencyGraph, scores: Dict[int, torch.Tensor],
                        removed: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """Removal masks where every tower that derives its head size from hidden / heads keeps
    heads * head_dim hidden channels (see the module docstring). `removed` is not modified."""
    removed = dict(removed)
    hidden_groups = _hidden_groups_by_scope(graph, model)
    by_index = {g.index: g for g in graph.groups}
    for scope, blocks in _kept_heads(model, graph, removed).items():
        counts = {(h, kept, hd) for h, kept, hd in blocks}
        if len(counts) != 1:
            continue                        # not uniform (or per-stage heads): no single config value anyway
        h, kept, hd = counts.pop()
        hidden = getattr(hf.resolve(model.config, scope), "hidden_size", None)
        if kept == h or hidden != h * hd or not hf.head_size_follows_hidden(model, scope):
            continue
        if not hidden_groups.get(scope):
            warnings.warn(f"Structured(uniform=True): {type(model).__name__}{' ' + scope if scope else ''} derives "
                          f"its head size from hidden_size / heads and its hidden size is not prunable here (the "
                          f"model's outputs carry it), so plain from_pretrained cannot rebuild {kept} heads; "
                          f"reload the saved result with pk.load(dir)", UserWarning, stacklevel=4)
            continue
        for gi in hidden_groups[scope]:
            g = by_index[gi]
            keep = kept * hd // g.unit_size
            if keep * g.unit_size != kept * hd or keep > g.n_units:
                continue
            mask = torch.ones(g.n_units, dtype=torch.bool)
            mask[torch.argsort(scores[gi], descending=True, stable=True)[:keep]] = False
            removed[gi] = mask
    return removed

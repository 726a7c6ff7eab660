"""TODO"""
from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from typing import Dict

import torch

from prunekit.errors import ConfigError
from prunekit.graph.groups import DependencyGraph, Group
from prunekit.models.hf import K_NAMES
from prunekit.structured import criteria as S
from prunekit.structured.config import MACs, Structured, matches_module

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
                raise ConfigError(f"importance callable returned {s.numel()} scores for {g.describe()} "
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
        if any(matches_module(pat, m) for m in (g.producers or g.modules)):
            found.append(float(r))
    return min(found) if found else 0.0


def group_round_to(graph: DependencyGraph, g: Group, round_to: int) -> int:
    """`round_to`, raised to what the kernels reading the group's tensors require: stacked expert weights
    (3-D, run by torch._grouped_mm) need rows whose strides are multiples of 16 bytes. Worked out in units (a
    member may hold several positions per unit, e.g. a fused gate_up_proj) and returned in `round_keep`'s terms."""
    step = round_to // math.gcd(round_to, g.unit_size)                   # units, as round_keep counts them
    for m in g.members:
        t = graph.params.get(m.name)
        if t is not None and t.dim() == 3:
            align = max(1, 16 // t.element_size())
            per_unit = max(1, len(m.pos) // max(1, g.n_units))
            step = math.lcm(step, align // math.gcd(align, per_unit))
    return step * g.unit_size


def min_keep(g: Group, round_to: int) -> int:
    """Fewest units a group may keep: at least one, and at least `round_to` channels."""
    return max(1, math.ceil(round_to / max(1, g.unit_size)))


def round_keep(g: Group, keep: int, round_to: int) -> int:
    """Round a keep-count up so that kept channels are a multiple of `round_to` (when the group allows)."""
    if round_to <= 1:
        return keep
    step = round_to // math.gcd(round_to, g.unit_size)
    keep = int(math.ceil(keep / step) * step)
    return min(keep, g.n_units)


def _peer_key(g: Group):
    """Groups that play the same role in different blocks share a key: producer names with block numbers
    masked (model.layers.#.mlp.up_proj), unit count and unit size."""
    names = {re.sub(r"\.\d+(?=\.|$)", ".#", p) for p in (g.producers or g.modules)}
    return tuple(sorted(names)), g.n_units, g.unit_size


def _uniform_keep(graph: DependencyGraph, keep_n: Dict[int, int], cfg: Structured, skip) -> None:
    """uniform=True: peers keep their mean count; tp_degree: attention groups keep a multiple of it."""
    peers = defaultdict(list)
    for g in graph.groups:
        if g.index not in skip:
            peers[_peer_key(g)].append(g)
    for (names, n_units, _), gs in peers.items():
        if cfg.uniform:
            k = int(round(sum(keep_n[g.index] for g in gs) / len(gs)))
            for g in gs:
                keep_n[g.index] = k
        if cfg.tp_degree and any(n.rpartition(".")[2] in K_NAMES for n in names):
            t = cfg.tp_degree
            if n_units % t:
                raise ConfigError(f"Structured.tp_degree={t} does not divide the {n_units} KV heads of "
                                  f"{gs[0].describe()[:80]}; use a divisor of {n_units}")
            for g in gs:
                keep_n[g.index] = min(n_units, max(t, int(round(keep_n[g.index] / t)) * t))


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
        cap = {g.index: min(int(math.floor(cfg.max_ratio_per_layer * g.n_units)),
                            g.n_units - min_keep(g, group_round_to(graph, g, cfg.round_to))) for g in graph.groups}
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
            mk = min_keep(g, group_round_to(graph, g, cfg.round_to))
            if keep < mk:
                if n_rm > 0:
                    clamped.append(g)
                keep = min(mk, g.n_units)
            keep_n[g.index] = keep
    if cfg.uniform or cfg.tp_degree:
        _uniform_keep(graph, keep_n, cfg, skip)
    removed = {}
    for g in graph.groups:
        if g.index in skip:
            continue
        rt = group_round_to(graph, g, cfg.round_to)
        keep = round_keep(g, max(keep_n[g.index], min(min_keep(g, rt), g.n_units)), rt)
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

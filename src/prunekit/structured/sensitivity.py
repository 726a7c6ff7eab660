"""TODO"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from prunekit.batch import progress
from prunekit.graph.groups import DependencyGraph
from prunekit.objective import calibration_batches, mean_loss
from prunekit.structured.allocate import group_scores
from prunekit.structured.config import Structured
from prunekit.structured.cut import remove_units
from prunekit.structured.importance import prepare, resolve


def inverse_sensitivity_ratios(sens: Sequence[float], sizes: Sequence[int], ratio: float, max_ratio: float,
                               eps: Optional[float] = None) -> List[float]:
    """Per-group ratios proportional to 1 / (sensitivity + eps), scaled so that the removed units add up
    to `ratio` of all units (the same budget as a uniform ratio), each capped at `max_ratio`.

    Groups whose loss did not grow (sensitivity <= 0) count as sensitivity 0, i.e. the cheapest to prune.
    eps defaults to 5% of the mean positive sensitivity, so a free group does not take the whole budget."""
    s = [max(0.0, float(v)) for v in sens]
    pos = [v for v in s if v > 0]
    eps = eps if eps is not None else (0.05 * sum(pos) / len(pos) if pos else 1.0)
    w = [1.0 / (v + eps) for v in s]
    budget = ratio * float(sum(sizes))
    if budget <= 0:
        return [0.0] * len(s)

    def removed(c):
        return sum(min(max_ratio, c * wi) * n for wi, n in zip(w, sizes))

    lo, hi = 0.0, 1.0
    while removed(hi) < budget and hi < 1e12:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < budget else (lo, mid)
    return [min(max_ratio, hi * wi) for wi in w]


# --------------------------------------------------------------------------------------------- sensitivity


def group_key(group) -> Optional[str]:
    """A regex that `Structured.ratio` matches to exactly this group (its first producer module)."""
    return "^" + re.escape(group.producers[0]) + "$" if group.producers else None


def measure_sensitivity(model: nn.Module, graph, scores: Dict[int, torch.Tensor], ratio: float, data,
                        loss_fn: Optional[Callable] = None, batches: int = 4, quiet: bool = True
                        ) -> Dict[int, float]:
    """{group index: calibration-loss increase when only that group loses `ratio` of its lowest-scored
    units}. Each probe cuts a copy of the model (real surgery, so any architecture the graph handles works)."""
    cal = calibration_batches(data, batches)
    base = mean_loss(model, cal, loss_fn)
    out = {}
    for g in progress(graph.groups, "sensitivity", quiet):
        n_rm = min(g.n_units - 1, int(math.floor(ratio * g.n_units + 1e-9)))
        if n_rm <= 0 or group_key(g) is None:
            continue
        order = torch.argsort(scores[g.index], stable=True)
        mask = torch.zeros(g.n_units, dtype=torch.bool)
        mask[order[:n_rm]] = True
        pruned, _, _ = remove_units(model, graph, {g.index: mask})
        out[g.index] = mean_loss(pruned, cal, loss_fn) - base
    return out


def sensitivity_ratios(model: nn.Module, example_inputs, data, ratio: float = 0.5, importance="l2",
                       max_ratio: float = 0.9, loss_fn: Optional[Callable] = None, batches: int = 4,
                       quiet: bool = True) -> Dict[str, float]:
    """Sensitivity-based allocation: `{group regex: ratio}` for `pk.Structured(ratio=...)`.

    Measures each group's sensitivity at `ratio` (see `measure_sensitivity`), then sets per-group ratios
    inversely proportional to it with the same total number of removed units as a uniform `ratio`."""
    graph = DependencyGraph(model, example_inputs)
    imp = prepare(resolve(importance), model, graph, data, loss_fn)
    cfg = Structured(ratio=ratio, importance=imp)
    sc = group_scores(graph, cfg, {**graph.params, **graph.buffers})
    sens = measure_sensitivity(model, graph, sc, ratio, data, loss_fn, batches, quiet)
    groups = [graph.groups[i] for i in sens]
    rs = inverse_sensitivity_ratios([sens[g.index] for g in groups], [g.n_units for g in groups], ratio, max_ratio)
    return {group_key(g): float(r) for g, r in zip(groups, rs)}

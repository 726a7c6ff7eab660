"""Latency targets: prune until the model is `speedup` times faster *as measured on this machine*.

    pk.prune(model, pk.Structured(importance="l2", target=Latency(speedup=2.0, batch_size=16)),
             example_inputs=x)

MACs are a poor proxy for latency (memory-bound layers, kernel choice, padding to vector widths), so the
allocation is driven by timings:

1. Probe: time the model with each group alone pruned by `probe_ratio` (interleaved with the dense model,
   so load drift cancels). The saving per removed unit is that group's *latency cost* per unit.
2. Rank: every unit gets priority = (its importance, normalized per group) / (its group's cost)^`cost_weight`:
   cheap-to-lose, expensive-to-run units go first (allocation="cost"), or every group is cut by the same
   ratio (allocation="uniform").
3. Bisect the number of units removed in that order, timing the *actual pruned model* at every step,
   until the measured speedup is within `tolerance` of the request.
4. Verify: time the chosen model once more with more repetitions and report requested vs achieved.

If even `max_ratio` per group cannot reach the request, the most pruned model is kept, a warning says so
and the info dict has `latency_reached: False`.

All timing goes through one `timer(models: {name: module}, inputs) -> {name: seconds}` so tests inject a
deterministic fake and the logic is tested without timing assertions.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from prunekit.batch import batch_size_of, eval_mode, progress, repeat_to_batch
from prunekit.measure.latency import measure_latency
from prunekit.structured import criteria as S
from prunekit.structured.allocate import allocate, group_round_to, min_keep, round_keep
from prunekit.structured.config import Latency
from prunekit.structured.cut import remove_units

Timer = Callable[[Dict[str, nn.Module], object], Dict[str, float]]


# --------------------------------------------------------------------------------------------- timing


def measured_timer(threads: int = 1, reps: int = 15, warmup: int = 3, statistic: str = "median") -> Timer:
    """The real timer: `prunekit.measure.measure_latency` (interleaved, pinned threads), seconds per call."""

    def timer(models: Dict[str, nn.Module], inputs) -> Dict[str, float]:
        res = measure_latency(models, inputs, batch_sizes=(_batch_of(inputs),), threads=threads,
                              warmup=warmup, reps=reps)
        key = "median_ms" if statistic == "median" else "min_ms"
        return {r["model"]: r[key] / 1e3 for r in res["rows"]}
    return timer


def _batch_of(inputs) -> int:
    return batch_size_of(inputs)


def speedup_of(timer: Timer, base: nn.Module, cand: nn.Module, inputs) -> Tuple[float, Dict[str, float]]:
    """dense time / candidate time from one interleaved measurement of both."""
    t = timer({"dense": base, "pruned": cand}, inputs)
    return t["dense"] / max(t["pruned"], 1e-12), t


# --------------------------------------------------------------------------------------------- pure allocation


def unit_priorities(scores: Dict[int, torch.Tensor], costs: Dict[int, float], sizes: Dict[int, int],
                    cost_weight: float) -> List[Tuple[float, int, int]]:
    """[(priority, group, unit)] sorted ascending = removal order.

    priority = score normalized by its group's mean / (cost per unit / mean cost per unit)^cost_weight.
    A group whose probe saved no time (cost <= 0) gets a tiny cost, so its units are removed last."""
    pos = [c for c in costs.values() if c > 0]
    mean_cost = sum(pos) / len(pos) if pos else 1.0
    out = []
    for gi, s in scores.items():
        c = costs.get(gi, 0.0)
        rel = max(c / mean_cost, 1e-3) if c > 0 else 1e-3
        ns = S.normalize(s.double().clone())
        for u in range(sizes[gi]):
            out.append((float(ns[u]) / rel ** cost_weight, gi, u))
    out.sort()
    return out


def removal_from_order(order: List[Tuple[float, int, int]], count: int, caps: Dict[int, int],
                       sizes: Dict[int, int]) -> Dict[int, torch.Tensor]:
    """Remove the first `count` units of `order`, skipping units of groups that reached their cap."""
    removed = {gi: torch.zeros(n, dtype=torch.bool) for gi, n in sizes.items()}
    taken = {gi: 0 for gi in sizes}
    n = 0
    for _, gi, u in order:
        if n >= count:
            break
        if taken[gi] < caps[gi]:
            removed[gi][u] = True
            taken[gi] += 1
            n += 1
    return {gi: m for gi, m in removed.items() if m.any()}


def bisect_count(speedup_at: Callable[[int], float], hi: int, target: float, tolerance: float,
                 max_evals: int) -> Tuple[int, float, List[Tuple[int, float]], bool]:
    """Smallest removal count whose speedup reaches `target` (within tolerance), by bisection on [0, hi].

    Returns (count, its speedup, [(count, speedup) evaluated], reached). Measured speedups are noisy and
    only roughly monotone, so the answer is the evaluated count whose speedup is closest to the target
    from above (or, if none reaches it, the largest speedup seen)."""
    history: List[Tuple[int, float]] = []
    s_hi = speedup_at(hi)
    history.append((hi, s_hi))
    if s_hi < target * (1 - tolerance):
        return hi, s_hi, history, False
    lo = 0
    while hi - lo > 1 and len(history) < max_evals:
        mid = (lo + hi) // 2
        s = speedup_at(mid)
        history.append((mid, s))
        if abs(s - target) <= tolerance * target:
            return mid, s, history, True
        if s < target:
            lo = mid
        else:
            hi = mid
    ok = [(c, s) for c, s in history if s >= target * (1 - tolerance)]
    c, s = min(ok, key=lambda cs: (abs(cs[1] - target), cs[0]))
    return c, s, history, True


# --------------------------------------------------------------------------------------------- driver


def _caps(graph, cfg, lat: Latency) -> Dict[int, int]:
    caps = {}
    limit = min(lat.max_ratio, cfg.max_ratio_per_layer)
    for g in graph.groups:
        rt = group_round_to(graph, g, cfg.round_to)
        keep = max(g.n_units - int(math.floor(limit * g.n_units + 1e-9)), min_keep(g, rt))
        keep = round_keep(g, min(keep, g.n_units), rt)
        caps[g.index] = max(0, g.n_units - keep)
    return caps


def _apply_round_to(graph, removed: Dict[int, torch.Tensor], scores, round_to: int) -> Dict[int, torch.Tensor]:
    """Give back the highest-scored removed units until every kept count is a multiple of round_to (raised per
    group to what its kernels need, see allocate.group_round_to)."""
    out = {}
    for gi, mask in removed.items():
        g = graph.groups[gi]
        rt = group_round_to(graph, g, round_to)
        if rt <= 1:
            out[gi] = mask
            continue
        keep = round_keep(g, int((~mask).sum()), rt)
        if keep >= g.n_units:
            continue
        order = torch.argsort(torch.where(mask, scores[gi], torch.full_like(scores[gi], math.inf)), descending=True,
                              stable=True)
        m = torch.ones(g.n_units, dtype=torch.bool)
        m[order[:keep]] = False
        out[gi] = m
    return out


def probe_costs(model: nn.Module, graph, scores, probe_ratio: float, caps: Dict[int, int], timer: Timer,
                inputs, quiet: bool = True) -> Dict[int, float]:
    """{group: seconds saved per removed unit} from timing the model with each group alone cut."""
    costs = {}
    for g in progress(graph.groups, "latency probes", quiet):
        n = min(caps[g.index], max(1, int(round(probe_ratio * g.n_units))))
        if n <= 0:
            continue
        order = torch.argsort(scores[g.index], stable=True)
        mask = torch.zeros(g.n_units, dtype=torch.bool)
        mask[order[:n]] = True
        pruned, _, _ = remove_units(model, graph, {g.index: mask})
        t = timer({"dense": model, "pruned": pruned}, inputs)
        costs[g.index] = (t["dense"] - t["pruned"]) / n
    return costs


def allocate_for_latency(model: nn.Module, graph, scores: Dict[int, torch.Tensor], cfg, example_inputs,
                         timer: Optional[Timer] = None, final_timer: Optional[Timer] = None,
                         quiet: bool = True) -> Tuple[Dict[int, torch.Tensor], dict]:
    """Choose units to remove so that the pruned model is `cfg.target.speedup` times faster (measured).

    cfg: the Structured config (its `target` is a Latency). Returns (removed, info) where info has
    latency_requested, latency_achieved, latency_reached, latency_dense_ms, latency_pruned_ms,
    latency_evaluations (the search history) and latency_costs_ms_per_unit.
    timer / final_timer: `(models, inputs) -> {name: seconds}`; default the real interleaved timer (the final
    check with 3 x reps). Tests pass a deterministic fake."""
    lat: Latency = cfg.target
    if timer is None:
        timer = measured_timer(lat.threads, lat.reps, lat.warmup, lat.statistic)
        final_timer = final_timer or measured_timer(lat.threads, 3 * lat.reps, lat.warmup, lat.statistic)
    final_timer = final_timer or timer
    inputs = repeat_to_batch(example_inputs, lat.batch_size)
    with eval_mode(model):
        removed, achieved, t, history, reached, costs = _search(model, graph, scores, cfg, timer, final_timer,
                                                                inputs, quiet)
    reached = reached and achieved >= lat.speedup * (1 - 2 * lat.tolerance)
    info = {"latency_requested": float(lat.speedup), "latency_achieved": float(achieved),
            "latency_reached": bool(reached), "latency_dense_ms": t["dense"] * 1e3,
            "latency_pruned_ms": t["pruned"] * 1e3, "latency_batch_size": lat.batch_size,
            "latency_threads": lat.threads, "latency_allocation": lat.allocation,
            "latency_evaluations": [{"units_removed": c, "speedup": s} for c, s in history],
            "latency_costs_ms_per_unit": {str(k): v * 1e3 for k, v in costs.items()}}
    if not reached:
        msg = (f"Latency target {lat.speedup:.2f}x not reached: the most pruned model allowed "
               f"(max_ratio={min(lat.max_ratio, cfg.max_ratio_per_layer)} per group) measures {achieved:.2f}x at "
               f"batch {lat.batch_size}, {lat.threads} thread(s). Keeping it; raise max_ratio, or ask for less.")
        info["latency_message"] = msg
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return removed, info


def _search(model, graph, scores, cfg, timer, final_timer, inputs, quiet):
    """Bisect the number of removed units until the measured speedup meets `cfg.target.speedup`."""
    lat: Latency = cfg.target
    caps = _caps(graph, cfg, lat)
    sizes = {g.index: g.n_units for g in graph.groups}
    costs: Dict[int, float] = {}
    if lat.allocation == "cost":
        costs = probe_costs(model, graph, scores, lat.probe_ratio, caps, timer, inputs, quiet)
        order = unit_priorities(scores, costs, sizes, lat.cost_weight)

        def removal(k):
            return _apply_round_to(graph, removal_from_order(order, k, caps, sizes), scores, cfg.round_to)
        hi = sum(caps.values())
    else:
        steps = 200
        limit = min(lat.max_ratio, cfg.max_ratio_per_layer)

        def removal(k):
            return allocate(graph, scores, cfg, ratio=limit * k / steps, warn=False)
        hi = steps

    cache: Dict[int, float] = {}

    def speedup_at(k: int) -> float:
        if k not in cache:
            pruned, _, _ = remove_units(model, graph, removal(k))
            cache[k] = speedup_of(timer, model, pruned, inputs)[0]
        return cache[k]

    count, _, history, reached = bisect_count(speedup_at, hi, lat.speedup, lat.tolerance, lat.max_evals)
    removed = removal(count)
    pruned, _, _ = remove_units(model, graph, removed)
    achieved, t = speedup_of(final_timer, model, pruned, inputs)
    return removed, achieved, t, history, reached, costs

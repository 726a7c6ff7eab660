"""Evaluate a model per slice, and compare a pruned model with its reference slice by slice.

    res_ref = evaluate(dense, val_batches, metric="accuracy")          # slices = class labels by default
    res = evaluate(pruned, val_batches, metric="accuracy", reference=res_ref)
    print(res.comparison)                                              # per-slice drops, CIs, flagged slices

Metrics: "accuracy" (data: iterable of (inputs, labels) batches, or one (X, y) tensor pair),
"perplexity" (causal LM; data: `TokenWindows(ids, length)` or batches of input_ids windows),
"embedding_similarity" (data: batches of (inputs_a, inputs_b, human_scores); Pearson r between cosine
similarity of the two embeddings and the human scores), or any `f(model, batch) -> per-example scores`
(mean is the metric, higher is better; wrap in `metrics.from_callable(..., higher_is_better=False)` otherwise).

Slices: `None` (class labels when the data has labels, else one slice "all"), "label", a list with one tag
per example, or a function `example -> tag` (an example is the per-row piece of a batch, e.g. (x_i, y_i)).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from prunekit.batch import eval_mode
from prunekit.errors import MetricError
from prunekit.evaluate.compare import compare_slices
from prunekit.evaluate.metrics import Metric, TokenWindows, resolve
from prunekit.evaluate.result import EvalResult, sort_tags


def _as_batches(data, batch_size: int) -> Iterable:
    """Iterable of batches. A tuple of equal-length tensors ((X, y) or (A, B, scores)) or a single tensor is a
    whole dataset and is cut into batches; anything else is taken as already batched."""
    if isinstance(data, torch.Tensor):
        return [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    if isinstance(data, tuple) and 2 <= len(data) <= 3 and all(isinstance(t, torch.Tensor) for t in data):
        n = len(data[0])
        if all(len(t) == n for t in data):
            return [tuple(t[i:i + batch_size] for t in data) for i in range(0, n, batch_size)]
    if not isinstance(data, Iterable):
        raise MetricError(f"data must be an iterable of batches or an (X, y) tensor pair, got {type(data).__name__}")
    return data


def _slice_tags(m: Metric, slices, batch, n: int) -> Optional[List[Any]]:
    """Tags for one batch from a slice spec that works batch by batch (label / function); None otherwise."""
    if slices is None or isinstance(slices, str):
        labels = m.labels(batch)
        if labels is None:
            if slices == "label":
                raise MetricError(f"slices='label' but metric '{m.name}' data has no labels; pass a list of tags "
                                  f"or a function example -> tag")
            return ["all"] * n
        return labels
    if callable(slices):
        return [_hashable(slices(ex)) for ex in m.examples(batch)]
    return None


def _hashable(tag):
    if isinstance(tag, torch.Tensor):
        tag = tag.item()
    if isinstance(tag, np.generic):
        tag = tag.item()
    if not isinstance(tag, (str, int, float, bool)) and tag is not None:
        tag = str(tag)
    return tag


def evaluate(model: nn.Module, data, metric: Union[str, Metric, Callable] = "accuracy", slices=None,
             reference=None, *, batch_size: int = 64, max_batches: Optional[int] = None, **compare_kw) -> EvalResult:
    """Evaluate `model` on `data`, per slice; see the module docstring for metrics and slice specs.

    reference: an `EvalResult` (or a model, evaluated here on the same data) to compare against; the
    comparison (per-slice deltas, bootstrap CIs, flagged slices) is attached as `result.comparison`.
    `compare_kw` go to `compare_slices` (n_boot, seed, min_slice_size, ratio, alpha, ...).
    Runs under `torch.no_grad()` in eval mode; the model's train/eval mode is restored afterwards.
    """
    m = resolve(metric)
    if isinstance(slices, str) and slices != "label":
        raise MetricError(f"slices={slices!r}: give None, 'label', a list of tags, or a function example -> tag")
    rows, tags, n_batches = [], [], 0
    with eval_mode(model), torch.no_grad():
        for batch in _as_batches(data, batch_size):
            if max_batches is not None and n_batches >= max_batches:
                break
            r = np.asarray(m.per_example(model, batch), dtype=np.float64)
            t = _slice_tags(m, slices, batch, len(r))
            if t is not None and len(t) != len(r):
                raise MetricError(f"batch {n_batches}: {len(t)} slice tags for {len(r)} examples")
            rows.append(r)
            tags.extend([_hashable(x) for x in t] if t is not None else [])
            n_batches += 1
    if not rows:
        raise MetricError("data yielded no batches; nothing to evaluate")
    rows = np.concatenate(rows)
    if not callable(slices) and slices is not None and not isinstance(slices, str):
        tags = [_hashable(x) for x in list(slices)]
        if len(tags) != len(rows):
            raise MetricError(f"slices has {len(tags)} tags but the data has {len(rows)} examples; give one tag "
                              f"per example, in data order")
    result = _build(m, rows, tags, data, n_batches)
    if reference is not None:
        if isinstance(reference, nn.Module):
            reference = evaluate(reference, data, m, slices, batch_size=batch_size, max_batches=max_batches)
        if not isinstance(reference, EvalResult):
            raise MetricError(f"reference must be an EvalResult or an nn.Module, got {type(reference).__name__}")
        result.comparison = compare_slices(reference, result, **compare_kw)
    return result


def bootstrap_ci(rows: np.ndarray, aggregate: Callable, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> Optional[List[float]]:
    """Percentile bootstrap interval of `aggregate` over examples (windows, for perplexity); None under 2 rows.

    Resampling whole examples keeps each window's tokens together: tokens of one window are correlated, so a
    per-token bootstrap would give intervals that are too narrow."""
    if len(rows) < 2:
        return None
    rng = np.random.default_rng(seed)
    vals = np.array([aggregate(rows[rng.integers(0, len(rows), len(rows))]) for _ in range(n_boot)])
    vals = vals[np.isfinite(vals)]
    if len(vals) < 10:
        return None
    a = (1 - level) / 2
    return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]


def _build(m: Metric, rows: np.ndarray, tags: List[Any], data, n_batches: int) -> EvalResult:
    """Aggregate per-example rows into overall and per-slice values, and record how it was measured."""
    arr = np.array([str(t) for t in tags], dtype=object)
    slices = {}
    for t in sort_tags(tags):
        idx = np.flatnonzero(arr == str(t))
        slices[t] = {"n": int(len(idx)), "value": m.aggregate(rows[idx]), "ci": bootstrap_ci(rows[idx], m.aggregate)}
    meta = {"n_batches": n_batches, "columns": list(m.columns)}
    if isinstance(data, TokenWindows):
        meta.update(window_length=data.length, stride=data.stride)
    elif m.name == "perplexity":
        meta.update(window_length=int(rows[0, 1]) + 1, stride="as given (windows passed in by the caller)")
    agg = m.name if m.name in ("accuracy", "perplexity", "embedding_similarity") else "mean"
    if agg == "mean" and m.aggregate.__name__ != "mean_of_rows":
        agg = m.name  # custom aggregate: usable in this process, not restorable by from_dict
    res = EvalResult(m.name, m.higher_is_better, m.aggregate(rows), list(m.columns), rows, tags, slices, meta, agg)
    if agg == m.name and m.name not in ("accuracy", "perplexity", "embedding_similarity"):
        res.aggregate = m.aggregate  # instance attribute shadows the method for custom metrics
    return res

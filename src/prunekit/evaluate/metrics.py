"""Metrics as "per-example statistics + an aggregate".

Why this shape: a slice metric and a bootstrap both need to recompute the metric on an arbitrary subset of
examples. Accuracy is a mean of 0/1 scores, but perplexity is exp(total NLL / total tokens) and the
embedding score is a Pearson correlation over pairs; neither is a mean of per-example numbers. So every metric
stores a small row of statistics per example (``columns``) and an ``aggregate(rows) -> float`` that turns any
subset of rows back into the metric.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.batch import batch_size_of, call_model, model_device, to_device
from prunekit.errors import MetricError


@dataclasses.dataclass
class Metric:
    """One evaluation metric.

    name:             shown in results and reports.
    columns:          names of the per-example statistics `per_example` returns (one row per example).
    higher_is_better: decides the sign of a "drop" when comparing a pruned model with its reference.
    per_example:      f(model, batch) -> array (batch_size, len(columns)).
    aggregate:        f(rows: ndarray (n, len(columns))) -> float, valid for any subset of rows.
    examples:         f(batch) -> list of per-example objects handed to a user slice function.
    labels:           f(batch) -> list of class labels (for the default "label" slicing) or None.
    """
    name: str
    columns: Sequence[str]
    higher_is_better: bool
    per_example: Callable[[Any, Any], np.ndarray]
    aggregate: Callable[[np.ndarray], float]
    examples: Callable[[Any], List[Any]]
    labels: Callable[[Any], Any] = lambda batch: None


# ----------------------------------------------------------------------------------------------- helpers
def examples_of(x, n: int) -> List[Any]:
    """Cut a batch into its `n` examples, each keeping the batch's structure (tuple/dict/tensor)."""
    if isinstance(x, torch.Tensor):
        return [x[i] for i in range(n)]
    if isinstance(x, Mapping):
        parts = {k: examples_of(v, n) for k, v in x.items()}
        return [{k: parts[k][i] for k in parts} for i in range(n)]
    if isinstance(x, (list, tuple)):
        if all(isinstance(v, (int, float, str)) for v in x):
            return list(x)
        cols = [examples_of(v, n) for v in x]
        return [tuple(c[i] for c in cols) for i in range(n)]
    return [x] * n


def _logits(out):
    """Logits from a plain tensor, an HF ModelOutput, or a tuple whose first item is the logits."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise MetricError(f"model returned {type(out).__name__}; expected a logits tensor or an object with .logits")


def _labels_of(batch):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise MetricError(f"classification data must yield (inputs, labels) pairs, got a {type(batch).__name__}"
                          + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    return batch[1]


# ----------------------------------------------------------------------------------------------- accuracy
def _acc_per_example(model, batch):
    x, y = batch[0], _labels_of(batch)
    dev = model_device(model)
    logits = _logits(call_model(model, to_device(x, dev)))
    if logits.dim() != 2:
        raise MetricError(f"accuracy expects logits of shape (batch, classes), got {tuple(logits.shape)}")
    correct = (logits.argmax(-1).cpu() == torch.as_tensor(y).cpu()).double()
    return correct.numpy()[:, None]


def mean_of_rows(rows: np.ndarray) -> float:
    return float(rows[:, 0].mean()) if len(rows) else float("nan")


ACCURACY = Metric("accuracy", ["correct"], True, _acc_per_example, mean_of_rows,
                  examples=lambda b: examples_of(tuple(b), batch_size_of(b[1])),
                  labels=lambda b: [_plain(v) for v in torch.as_tensor(_labels_of(b)).tolist()])


# ----------------------------------------------------------------------------------------------- perplexity
def _window_ids(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[1], torch.Tensor):
        batch = batch[0]                                    # (windows, slice tags), e.g. data "lm-slices"
    ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise MetricError(f"perplexity expects integer input_ids windows of shape (batch, length), "
                          f"got dtype {ids.dtype} shape {tuple(ids.shape)}")
    if ids.shape[1] < 2:
        raise MetricError("perplexity windows need at least 2 tokens (one to predict from, one to predict)")
    return ids.long()


def _ppl_per_example(model, batch):
    ids = _window_ids(batch).to(model_device(model))
    logits = _logits(model(ids)).float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none").view(ids.shape[0], -1)
    ntok = torch.full((ids.shape[0],), nll.shape[1], dtype=torch.float64)
    return torch.stack([nll.sum(1).double().cpu(), ntok], 1).numpy()


def _ppl_aggregate(rows: np.ndarray) -> float:
    if not len(rows):
        return float("nan")
    return float(math.exp(rows[:, 0].sum() / rows[:, 1].sum()))


def _window_tags(batch):
    """Slice tags carried next to the windows ((ids, tags) batches), else None (one slice, "all")."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[1], torch.Tensor):
        return [str(t) for t in batch[1]]
    return None


PERPLEXITY = Metric("perplexity", ["nll_sum", "n_tokens"], False, _ppl_per_example, _ppl_aggregate,
                    examples=lambda b: examples_of(_window_ids(b), _window_ids(b).shape[0]), labels=_window_tags)


class TokenWindows:
    """Non-overlapping fixed-length windows over one token stream, served in batches.

    Why a class: perplexity depends on window length and stride, so `evaluate` records both (from
    `.length`/`.stride`) next to the number. The tail shorter than `length` is dropped, not padded, so every
    window scores the same number of tokens.
    """

    def __init__(self, token_ids, length: int, batch_size: int = 8):
        ids = torch.as_tensor(token_ids).long().flatten()
        if length < 2:
            raise MetricError(f"TokenWindows(length={length}): length must be >= 2")
        n = ids.numel() // length
        if n == 0:
            raise MetricError(f"TokenWindows: {ids.numel()} tokens are fewer than one window of length {length}")
        self.windows = ids[: n * length].view(n, length)
        self.length, self.stride, self.batch_size = length, length, batch_size

    def __len__(self):
        return (len(self.windows) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for i in range(0, len(self.windows), self.batch_size):
            yield self.windows[i:i + self.batch_size]


# ----------------------------------------------------------------------------------------------- embeddings
def embed(model, inputs) -> torch.Tensor:
    """Sentence embeddings from a model: (batch, dim) outputs as they are; token outputs are mean-pooled over
    the attention mask (the sentence-transformers recipe for MiniLM-style encoders)."""
    out = call_model(model, inputs)
    if isinstance(out, dict) and "sentence_embedding" in out:
        return out["sentence_embedding"]
    h = out if isinstance(out, torch.Tensor) else getattr(out, "last_hidden_state", None)
    if h is None and isinstance(out, (tuple, list)):
        h = out[0]
    if not isinstance(h, torch.Tensor):
        raise MetricError(f"cannot get embeddings from a {type(out).__name__} output; return a tensor or an "
                          f"object with .last_hidden_state")
    if h.dim() == 2:
        return h
    if h.dim() != 3:
        raise MetricError(f"embedding output must be (batch, dim) or (batch, tokens, dim), got {tuple(h.shape)}")
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if mask is None:
        return h.mean(1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _emb_parts(batch):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
        raise MetricError("embedding_similarity data must yield (inputs_a, inputs_b, human_scores) triples")
    return batch


def _emb_per_example(model, batch):
    a, b, gold = _emb_parts(batch)
    dev = model_device(model)
    ea, eb = embed(model, to_device(a, dev)), embed(model, to_device(b, dev))
    cos = F.cosine_similarity(ea.float(), eb.float(), dim=-1).double().cpu()
    return torch.stack([cos, torch.as_tensor(gold, dtype=torch.float64).cpu()], 1).numpy()


def _pearson(rows: np.ndarray) -> float:
    if len(rows) < 2 or rows[:, 0].std() == 0 or rows[:, 1].std() == 0:
        return float("nan")
    return float(np.corrcoef(rows[:, 0], rows[:, 1])[0, 1])


EMBEDDING_SIMILARITY = Metric("embedding_similarity", ["cosine", "human_score"], True, _emb_per_example,
                              _pearson, examples=lambda b: examples_of(tuple(_emb_parts(b)), batch_size_of(b[2])))


# ----------------------------------------------------------------------------------------------- user metrics
def _plain(v):
    """JSON-friendly scalar for a tag/label."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def from_callable(fn: Callable, name: str = None, higher_is_better: bool = True) -> Metric:
    """Wrap `fn(model, batch) -> per-example scores (batch,)` as a metric whose value is their mean."""

    def per_example(model, batch):
        s = fn(model, batch)
        s = s.detach().cpu().double().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, dtype=np.float64)
        if s.ndim != 1:
            raise MetricError(f"user metric {name or fn!r} must return one score per example (1-D), "
                              f"got shape {s.shape}")
        return s[:, None]

    def labels(batch):
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            try:
                return [_plain(v) for v in torch.as_tensor(batch[1]).tolist()]
            except (TypeError, ValueError, RuntimeError):
                return None
        return None

    name = name or getattr(fn, "__name__", "")
    if not name or name.startswith("<"):  # lambdas and partials have no useful name
        name = "user_metric"
    return Metric(name, ["score"], higher_is_better, per_example,
                  mean_of_rows, examples=lambda b: examples_of(b, batch_size_of(b)), labels=labels)


BUILTIN: Dict[str, Metric] = {m.name: m for m in (ACCURACY, PERPLEXITY, EMBEDDING_SIMILARITY)}
AGGREGATES: Dict[str, Callable[[np.ndarray], float]] = {m.name: m.aggregate for m in BUILTIN.values()}


def resolve(metric) -> Metric:
    """A Metric from a built-in name, a Metric object, or a per-example-score callable."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in BUILTIN:
            raise MetricError(f"unknown metric '{metric}'; built-ins are {sorted(BUILTIN)}, or pass a callable "
                              f"f(model, batch) -> per-example scores")
        return BUILTIN[metric]
    if callable(metric):
        return from_callable(metric)
    raise MetricError(f"metric must be a name, a prunekit Metric or a callable, got {type(metric).__name__}")

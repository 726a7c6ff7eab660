"""EvalResult: overall metric, per-slice metric and the per-example statistics behind them (for bootstrap)."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, List, Optional

import numpy as np

from prunekit.errors import MetricError
from prunekit.evaluate.metrics import AGGREGATES, mean_of_rows


def json_float(v):
    """NaN/inf are not valid JSON; write them as null so any JSON reader can load the file."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def sort_tags(tags) -> List[Any]:
    """Tags in a stable, readable order: natural order when comparable (ints, strings), else by text."""
    uniq = list(dict.fromkeys(tags))
    try:
        return sorted(uniq)
    except TypeError:
        return sorted(uniq, key=str)


@dataclasses.dataclass
class EvalResult:
    """What `evaluate` returns.

    value:   the metric on all examples.
    slices:  {tag: {"n": examples, "value": metric on that slice, "ci": 95% bootstrap interval over examples}}.
    rows:    per-example statistics, shape (n, len(columns)); `aggregate(rows[subset])` recomputes the metric.
    tags:    the slice tag of every example (same order as rows).
    meta:    how it was measured (window length/stride for perplexity, number of batches, ...).
    comparison: a `SliceComparison` against the reference when `evaluate(..., reference=...)` was given.
    """
    metric: str
    higher_is_better: bool
    value: float
    columns: List[str]
    rows: np.ndarray
    tags: List[Any]
    slices: Dict[Any, Dict[str, Any]]
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)
    aggregate_name: str = "mean"
    comparison: Any = None

    @property
    def n(self) -> int:
        return len(self.rows)

    def aggregate(self, rows: np.ndarray) -> float:
        """Recompute this metric on a subset of rows (used by slices and bootstrap)."""
        fn = AGGREGATES.get(self.aggregate_name, mean_of_rows if self.aggregate_name == "mean" else None)
        if fn is None:
            raise MetricError(f"EvalResult for metric '{self.metric}' has aggregate '{self.aggregate_name}' that "
                              f"prunekit does not know; known: {sorted(AGGREGATES) + ['mean']}")
        return fn(rows)

    def to_dict(self) -> dict:
        """JSON-serializable form (per-example rows included, so a saved result can be bootstrapped later)."""
        d = {
            "metric": self.metric, "higher_is_better": self.higher_is_better, "value": json_float(self.value),
            "n": self.n, "aggregate": self.aggregate_name,
            "slices": {str(t): {"n": s["n"], "value": json_float(s["value"]), "ci": s.get("ci")}
                       for t, s in self.slices.items()},
            "per_example": {"columns": list(self.columns), "rows": self.rows.tolist(), "tags": list(self.tags)},
            "meta": self.meta,
        }
        if self.comparison is not None:
            d["comparison"] = self.comparison.to_dict()
        return d

    def to_json(self, path: Optional[str] = None) -> str:
        s = json.dumps(self.to_dict())
        if path:
            with open(path, "w") as f:
                f.write(s)
        return s

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        pe = d["per_example"]
        rows = np.asarray(pe["rows"], dtype=np.float64).reshape(-1, len(pe["columns"]))
        tags = list(pe["tags"])
        slices = {t: {"n": sum(1 for x in tags if x == t), "value": None} for t in sort_tags(tags)}
        r = cls(d["metric"], d["higher_is_better"], d["value"], list(pe["columns"]), rows, tags, slices,
                d.get("meta", {}), d.get("aggregate", "mean"))
        for t in slices:
            slices[t]["value"] = r.aggregate(rows[[i for i, x in enumerate(tags) if x == t]])
        return r

    def summary(self) -> str:
        lines = [f"{self.metric}: {self.value:.4f} on {self.n} examples"]
        for t, s in self.slices.items():
            ci = s.get("ci")
            ci = f"  95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            lines.append(f"  {str(t):>20s}  n={s['n']:<6d} {s['value']:.4f}{ci}")
        return "\n".join(lines)

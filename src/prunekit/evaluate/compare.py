"""Per-slice quality deltas between a reference and a pruned model, with paired bootstrap intervals.

The question answered: "did pruning hurt some slice much more than the model as a whole?" A slice is
flagged when both hold:
  * its drop is more than `ratio` (default 2x) the overall drop (and above `min_abs_drop`), and
  * the confidence interval of (slice drop - overall drop) excludes 0, so the excess is not noise.
The interval comes from a paired, stratified bootstrap: each replicate resamples examples within every
slice (same indices for both models, since they saw the same examples), and the overall metric is
recomputed from the union of the resampled slices. Because many slices are tested at once, the interval
level is Bonferroni-corrected (alpha / number of judged slices) by default; without it, ~5% of slices would
be flagged under pure noise. Slices with fewer than `min_slice_size` examples are reported as
"too few to judge" and never flagged.

Perplexity is compared on the log scale (`log=None` picks it for perplexity): the drop is the rise in
log-perplexity (mean NLL per token), so a slice that starts at perplexity 400 (a language the model barely
knows) is not flagged merely because the same relative loss is a larger absolute number there.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import numpy as np

from prunekit.errors import CompareError
from prunekit.evaluate.result import EvalResult, json_float

TOO_FEW = "too few to judge"
FLAGGED = "flagged"
OK = "ok"
UNDEFINED = "undefined"


@dataclasses.dataclass
class SliceComparison:
    """Result of `compare_slices`: overall and per-slice drops with intervals and a status per slice.

    A "drop" is always "how much worse": reference - pruned for higher-is-better metrics (accuracy),
    pruned - reference for lower-is-better ones (perplexity). Positive = worse.
    """
    metric: str
    higher_is_better: bool
    overall: Dict[str, Any]
    rows: List[Dict[str, Any]]
    params: Dict[str, Any]

    @property
    def flagged(self) -> List[Any]:
        return [r["slice"] for r in self.rows if r["status"] == FLAGGED]

    def to_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float):
                return json_float(v)
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, np.generic):
                return clean(v.item())
            return v
        return clean({"metric": self.metric, "higher_is_better": self.higher_is_better, "overall": self.overall,
                      "slices": [dict(r, slice=str(r["slice"])) for r in self.rows], "flagged":
                      [str(t) for t in self.flagged], "params": self.params})

    def to_markdown(self) -> str:
        o = self.overall
        what = f"log {self.metric}" if self.params.get("scale") == "log" else self.metric
        lines = [f"Overall {self.metric}: {o['reference']:.4f} -> {o['pruned']:.4f} ({what} "
                 f"drop {o['drop']:+.4f}, {100 * self.params['level']:.0f}% CI "
                 f"[{o['drop_ci'][0]:+.4f}, {o['drop_ci'][1]:+.4f}])", "",
                 "| slice | n | reference | pruned | drop | drop CI | excess over overall (CI) | status |",
                 "|---|---:|---:|---:|---:|---|---|---|"]
        for r in self.rows:
            ci = f"[{r['drop_ci'][0]:+.4f}, {r['drop_ci'][1]:+.4f}]" if r["drop_ci"] else "-"
            ex = (f"{r['excess']:+.4f} [{r['excess_ci'][0]:+.4f}, {r['excess_ci'][1]:+.4f}]"
                  if r["excess_ci"] else "-")
            status = f"**{r['status']}**" if r["status"] == FLAGGED else r["status"]
            lines.append(f"| {r['slice']} | {r['n']} | {r['reference']:.4f} | {r['pruned']:.4f} | "
                         f"{r['drop']:+.4f} | {ci} | {ex} | {status} |")
        return "\n".join(lines)

    __str__ = to_markdown


def _check_pair(ref: EvalResult, pru: EvalResult):
    """Paired bootstrap needs the same examples in the same order with the same tags."""
    if ref.metric != pru.metric:
        raise CompareError(f"cannot compare a '{ref.metric}' evaluation with a '{pru.metric}' one")
    if ref.n != pru.n:
        raise CompareError(f"reference has {ref.n} examples but pruned has {pru.n}; evaluate both models on the "
                           f"same data in the same order (no shuffling) so examples can be paired")
    if list(map(str, ref.tags)) != list(map(str, pru.tags)):
        raise CompareError("reference and pruned evaluations have different slice tags per example; evaluate both "
                           "on the same data, in the same order, with the same `slices=`")


def _drop(ref_value, pru_value, higher_is_better, log=False):
    if log:
        ref_value, pru_value = np.log(ref_value), np.log(pru_value)
    return (ref_value - pru_value) if higher_is_better else (pru_value - ref_value)


def _bootstrap(ref: EvalResult, pru: EvalResult, groups: Dict[Any, np.ndarray], n_boot: int, seed: int,
               log: bool):
    """Bootstrap replicates of the overall drop and of every slice's drop (paired, stratified by slice)."""
    rng = np.random.default_rng(seed)
    hib = ref.higher_is_better
    overall = np.empty(n_boot)
    per = {t: np.empty(n_boot) for t in groups}
    for b in range(n_boot):
        picks = []
        for t, idx in groups.items():
            p = idx[rng.integers(0, len(idx), len(idx))]
            picks.append(p)
            per[t][b] = _drop(ref.aggregate(ref.rows[p]), pru.aggregate(pru.rows[p]), hib, log)
        allp = np.concatenate(picks)
        overall[b] = _drop(ref.aggregate(ref.rows[allp]), pru.aggregate(pru.rows[allp]), hib, log)
    return overall, per


def _ci(samples: np.ndarray, level: float):
    s = samples[np.isfinite(samples)]
    if len(s) < 10:
        return None
    a = (1 - level) / 2
    return [float(np.quantile(s, a)), float(np.quantile(s, 1 - a))]


def compare_slices(reference: EvalResult, pruned: EvalResult, *, n_boot: int = 1000, seed: int = 0,
                   alpha: float = 0.05, min_slice_size: int = 20, ratio: float = 2.0, min_abs_drop: float = 0.0,
                   correction: str = "bonferroni", log: Optional[bool] = None) -> SliceComparison:
    """Per-slice drops of `pruned` vs `reference` with paired bootstrap CIs; flags disproportionately hurt slices.

    Both results must come from `evaluate` on the same data in the same order. See the module docstring for
    the flagging rule. `correction="none"` disables the multiple-comparison correction. `log`: compare
    log(metric) (default: True for perplexity, so drops are rises in log-perplexity), else the metric.
    """
    _check_pair(reference, pruned)
    if correction not in ("bonferroni", "none"):
        raise CompareError(f"correction must be 'bonferroni' or 'none', got {correction!r}")
    tags = np.array([str(t) for t in reference.tags], dtype=object)
    order = list(reference.slices)
    groups = {t: np.flatnonzero(tags == str(t)) for t in order}
    judged = [t for t in order if len(groups[t]) >= min_slice_size]
    level = 1 - alpha
    flag_level = 1 - alpha / max(len(judged), 1) if correction == "bonferroni" else level
    log = reference.metric == "perplexity" if log is None else bool(log)
    boot_overall, boot_per = _bootstrap(reference, pruned, groups, n_boot, seed, log)
    hib = reference.higher_is_better
    o_drop = _drop(reference.value, pruned.value, hib, log)
    overall = {"reference": reference.value, "pruned": pruned.value, "drop": o_drop, "n": reference.n,
               "drop_ci": _ci(boot_overall, level)}
    threshold = max(ratio * max(o_drop, 0.0), min_abs_drop)
    rows = []
    for t in order:
        idx = groups[t]
        r_v, p_v = reference.slices[t]["value"], pruned.slices[t]["value"]
        d = _drop(r_v, p_v, hib, log)
        row = {"slice": t, "n": int(len(idx)), "reference": r_v, "pruned": p_v, "drop": d,
               "drop_ci": _ci(boot_per[t], level), "excess": d - o_drop, "excess_ci": None}
        if len(idx) < min_slice_size:
            row["status"] = TOO_FEW
        elif not np.isfinite(d):
            row["status"] = UNDEFINED
        else:
            row["excess_ci"] = _ci(boot_per[t] - boot_overall, flag_level)
            significant = row["excess_ci"] is not None and row["excess_ci"][0] > 0
            row["status"] = FLAGGED if (d > threshold and significant) else OK
        rows.append(row)
    params = {"n_boot": n_boot, "seed": seed, "alpha": alpha, "level": level, "flag_level": flag_level,
              "correction": correction, "min_slice_size": min_slice_size, "ratio": ratio,
              "min_abs_drop": min_abs_drop, "threshold": threshold, "scale": "log" if log else "linear"}
    return SliceComparison(reference.metric, hib, overall, rows, params)

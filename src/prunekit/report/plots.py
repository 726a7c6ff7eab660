"""The report's PNG plots (matplotlib, Agg backend): quality vs speedup, per-slice drops, kept fractions."""
from __future__ import annotations

import io
import re
from typing import Any, Dict, List, Optional

FLAG, FEW, OK = "flagged", "too few to judge", "ok"
_STATUS_COLORS = {FLAG: "#c53030", FEW: "#a0aec0", OK: "#3182ce"}
_KIND_COLORS = ["#2b6cb0", "#dd6b20", "#2f855a", "#805ad5", "#b7791f", "#c53030", "#319795", "#718096"]


def _figure(width: float, height: float):
    """A figure with constrained layout: titles, tick labels and legends are fitted inside the canvas."""
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(width, height), layout="constrained")


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return buf.getvalue()


def curve_plot(norm) -> Optional[bytes]:
    steps = [s for s in norm["steps"] if s.get("speedup") is not None and s.get("quality") is not None]
    rows = [r for r in ((norm["summary"] or {}).get("rows") or [])
            if r.get("speedup") is not None and r.get("quality") is not None]
    if not steps and not rows:
        return None
    fig, ax = _figure(7, 4.2)
    if steps:
        ax.plot([s["speedup"] for s in steps], [s["quality"] for s in steps], "o-", color="#2b6cb0",
                label="pruning steps")
        for s in steps:
            ax.annotate(str(s.get("step")), (s["speedup"], s["quality"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color="#2b6cb0")
    for r, mk in zip(rows, "s^Dvp*"):
        ax.plot(r["speedup"], r["quality"], mk, markersize=9, label=r.get("variant"), alpha=0.85)
    metric = (norm["summary"] or {}).get("metric", "quality")
    ax.set_xlabel("speedup vs dense (median latency ratio)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs speedup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def slice_plot(comparison: Optional[Dict[str, Any]], title: str = "per-slice quality drop") -> Optional[bytes]:
    """Horizontal bars of each slice's drop with its bootstrap CI; red = flagged, grey = too few to judge."""
    rows = [r for r in (comparison or {}).get("slices", []) if r.get("drop") is not None]
    if not rows:
        return None
    fig, ax = _figure(8, max(2.8, 0.32 * len(rows) + 1.6))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        ci = r.get("drop_ci")
        err = [[r["drop"] - ci[0]], [ci[1] - r["drop"]]] if ci else None
        ax.barh(y, r["drop"], color=_STATUS_COLORS.get(r.get("status"), _STATUS_COLORS[OK]), xerr=err, capsize=2,
                error_kw={"elinewidth": 0.8})
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['slice']} (n={r['n']})" for r in rows], fontsize=8)
    o = comparison.get("overall", {})
    thr = comparison.get("params", {}).get("threshold")
    if o.get("drop") is not None:
        ax.axvline(o["drop"], color="black", lw=1, label=f"overall drop {o['drop']:+.4f}")
    if thr:
        ax.axvline(thr, color=_STATUS_COLORS[FLAG], lw=1, ls="--", label=f"flag threshold {thr:.4f}")
    ax.axvline(0, color="grey", lw=0.5)
    what = "log-perplexity rise" if comparison.get("params", {}).get("scale") == "log" else "drop"
    ax.set_xlabel(f"{what} (positive = worse), with bootstrap CI; red = flagged, grey = too few to judge")
    ax.set_title(title, loc="left")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))     # outside: never over a CI bar
    return _png(fig)


def widths_plot(layers: List[Dict[str, Any]], kinds: List[Dict[str, Any]]) -> Optional[bytes]:
    """Kept fraction per layer, one colour per unit kind (heads, FFN neurons, channels, ...), kinds side by side.

    `layers` / `kinds` as returned by prunekit.report.data.width_fractions."""
    layers = [x for x in layers if x.get("fraction") is not None]
    if not layers:
        return None
    color = {k["kind"]: _KIND_COLORS[i % len(_KIND_COLORS)] for i, k in enumerate(kinds)}
    xs, x, prev = [], 0.0, None
    for e in layers:                      # a one-bar gap between kinds
        x += 1.0 if prev in (None, e["kind"]) else 2.0
        xs.append(x)
        prev = e["kind"]
    fig, ax = _figure(max(7.0, 0.3 * len(layers) + 2.5), 4.2)
    for k in kinds:
        sel = [(xx, e) for xx, e in zip(xs, layers) if e["kind"] == k["kind"]]
        if not sel:
            continue
        label = k["kind"] + (f": {k['kept']:,} of {k['original']:,} kept ({k['fraction']:.0%})"
                             if k.get("fraction") is not None else "")
        ax.bar([xx for xx, _ in sel], [e["fraction"] for _, e in sel], color=color[k["kind"]], label=label)
    ax.axhline(1.0, color="grey", lw=0.6, ls="--")
    ax.set_xticks(xs)
    ax.set_xticklabels([e["name"] for e in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("kept fraction (kept / original)")
    ax.set_title("kept fraction per layer, by unit kind (counts in the table below)", loc="left")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def plot_name(comparison_name: str) -> str:
    """Plot key (and file stem under plots/) of an extra comparison's slice plot."""
    return "slices_" + re.sub(r"[^A-Za-z0-9_.-]", "_", comparison_name)


def make_plots(norm) -> Dict[str, bytes]:
    """PNG bytes for every plot whose data exists: curve, slices, widths, and slices_<name> per extra comparison."""
    import matplotlib
    matplotlib.use("Agg", force=True)  # headless; no display needed
    out = {"curve": curve_plot(norm), "slices": slice_plot(norm["slices"]),
           "widths": widths_plot(norm["widths"], norm["width_kinds"])}
    for c in norm["comparisons"]:
        out[plot_name(c["name"])] = slice_plot(c["comparison"], f"{c['title']}: per-slice drop")
    return {k: v for k, v in out.items() if v}

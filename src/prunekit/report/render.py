"""Turn run data into tables, PNG plots (matplotlib Agg), HTML and Markdown."""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Dict, List, Optional

_FLAG, _FEW, _OK = "flagged", "too few to judge", "ok"


# ----------------------------------------------------------------------------------------------- data
def _baseline(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    for r in rows:
        if r.get("variant") == "dense":
            return r
    return rows[0] if rows else None


def _widths(w) -> List[Dict[str, Any]]:
    """Accept [{"name","original","kept"}], {name: {"original","kept"}} or {name: [original, kept]}."""
    if not w:
        return []
    if isinstance(w, dict):
        out = []
        for k, v in w.items():
            if isinstance(v, dict):
                out.append({"name": k, "original": v.get("original"), "kept": v.get("kept")})
            else:
                out.append({"name": k, "original": v[0], "kept": v[1]})
        return out
    return [dict(x) for x in w]


def normalize(data: Dict[str, Any]) -> Dict[str, Any]:
    """Fill in derived numbers (speedup, size and param reduction vs the baseline) and put sections in order."""
    summary = dict(data.get("summary") or {})
    rows = [dict(r) for r in summary.get("rows", [])]
    base = _baseline(rows)
    for r in rows:
        for key, out, inverse in (("latency_ms", "speedup", True), ("size_bytes", "size_ratio", False),
                                  ("params", "params_ratio", False), ("memory_bytes", "memory_ratio", False)):
            b, v = (base or {}).get(key), r.get(key)
            if b and v:
                r[out] = b / v if inverse else v / b
    if rows:
        summary["rows"] = rows
    steps = sorted((dict(s) for s in data.get("steps") or []), key=lambda s: s.get("step", 0))
    return {
        "run": data.get("run") or {}, "complete": bool(data.get("complete")),
        "missing": list(data.get("missing", [])), "marker_found": bool(data.get("marker_found")),
        "source": data.get("source", ""), "summary": summary or None, "steps": steps,
        "slices": data.get("slices") or None, "widths": _widths(data.get("widths")), "env": data.get("env") or None,
    }


# ----------------------------------------------------------------------------------------------- formatting
def _f(v, kind: str = "num") -> str:
    if v is None or v == "":
        return "–"
    if kind == "bytes":
        return f"{v / 1e6:.2f} MB"
    if kind == "ms":
        return f"{v:.3f}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "int":
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _summary_table(norm) -> Optional[List[List[str]]]:
    s = norm["summary"]
    if not s or not s.get("rows"):
        return None
    metric = s.get("metric", "quality")
    hdr = ["variant", metric, "latency ms" + (f" (batch {s['batch_size']})" if s.get("batch_size") else ""),
           "speedup", "peak memory", "size on disk", "size vs dense", "params"]
    body = [[r.get("variant", f"row {i}"), _f(r.get("quality")), _f(r.get("latency_ms"), "ms"),
             _f(r.get("speedup"), "x"), _f(r.get("memory_bytes"), "bytes"), _f(r.get("size_bytes"), "bytes"),
             _f(r.get("size_ratio"), "x"), _f(r.get("params"), "int")] for i, r in enumerate(s["rows"])]
    return [hdr] + body


def _slice_rows(norm) -> List[Dict[str, Any]]:
    return list((norm["slices"] or {}).get("slices", []))


def _slice_table(norm) -> Optional[List[List[str]]]:
    rows = _slice_rows(norm)
    if not rows:
        return None
    hdr = ["slice", "n", "reference", "pruned", "drop", "drop CI", "excess over overall (CI)", "status"]

    def ci(c):
        return f"[{c[0]:+.4f}, {c[1]:+.4f}]" if c else "–"
    body = [[str(r["slice"]), str(r["n"]), _f(r.get("reference")), _f(r.get("pruned")),
             f"{r['drop']:+.4f}" if r.get("drop") is not None else "–", ci(r.get("drop_ci")),
             (f"{r['excess']:+.4f} {ci(r.get('excess_ci'))}" if r.get("excess") is not None else "–"),
             r.get("status", "")] for r in rows]
    return [hdr] + body


def _steps_table(norm) -> Optional[List[List[str]]]:
    steps = norm["steps"]
    if not steps:
        return None
    extra = [k for k in steps[0] if k not in ("step", "speedup", "quality")]
    hdr = ["step", "speedup", "quality"] + extra
    return [hdr] + [[str(s.get("step")), _f(s.get("speedup"), "x"), _f(s.get("quality"))] +
                    [_f(s.get(k)) for k in extra] for s in steps]


# ----------------------------------------------------------------------------------------------- plots
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _curve_plot(norm) -> Optional[bytes]:
    import matplotlib.pyplot as plt
    steps = [s for s in norm["steps"] if s.get("speedup") is not None and s.get("quality") is not None]
    rows = [r for r in ((norm["summary"] or {}).get("rows") or [])
            if r.get("speedup") is not None and r.get("quality") is not None]
    if not steps and not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
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


def _slice_plot(norm) -> Optional[bytes]:
    import matplotlib.pyplot as plt
    rows = [r for r in _slice_rows(norm) if r.get("drop") is not None]
    if not rows:
        return None
    colors = {_FLAG: "#c53030", _FEW: "#a0aec0", _OK: "#3182ce"}
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.32 * len(rows) + 1.2)))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        ci = r.get("drop_ci")
        err = [[r["drop"] - ci[0]], [ci[1] - r["drop"]]] if ci else None
        ax.barh(y, r["drop"], color=colors.get(r.get("status"), "#3182ce"), xerr=err, capsize=2,
                error_kw={"elinewidth": 0.8})
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['slice']} (n={r['n']})" for r in rows], fontsize=8)
    o = (norm["slices"] or {}).get("overall", {})
    thr = (norm["slices"] or {}).get("params", {}).get("threshold")
    if o.get("drop") is not None:
        ax.axvline(o["drop"], color="black", lw=1, label=f"overall drop {o['drop']:+.4f}")
    if thr:
        ax.axvline(thr, color="#c53030", lw=1, ls="--", label=f"flag threshold {thr:.4f}")
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("drop (positive = worse), with bootstrap CI")
    ax.set_title("per-slice quality drop (red = flagged, grey = too few to judge)")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _widths_plot(norm) -> Optional[bytes]:
    import matplotlib.pyplot as plt
    w = [x for x in norm["widths"] if x.get("kept") is not None]
    if not w:
        return None
    fig, ax = plt.subplots(figsize=(max(7, 0.28 * len(w) + 2), 4))
    xs = range(len(w))
    ax.bar(xs, [x.get("original") or 0 for x in w], color="#cbd5e0", label="original")
    ax.bar(xs, [x["kept"] for x in w], color="#2f855a", label="kept")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([x["name"] for x in w], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("width (channels / features / heads)")
    ax.set_title("per-layer kept widths")
    ax.legend(fontsize=8)
    return _png(fig)


def make_plots(norm) -> Dict[str, bytes]:
    """PNG bytes for every plot whose data exists: curve, slices, widths."""
    import matplotlib
    matplotlib.use("Agg", force=True)  # headless; no display needed
    out = {}
    for name, fn in (("curve", _curve_plot), ("slices", _slice_plot), ("widths", _widths_plot)):
        png = fn(norm)
        if png:
            out[name] = png
    return out


# ----------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#1a202c}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #e2e8f0}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #e2e8f0;padding:4px 8px}
th{background:#f7fafc;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.flagged td{background:#fed7d7;font-weight:600} tr.few td{color:#718096}
.badge{display:inline-block;padding:3px 10px;border-radius:4px;font-weight:700;color:white}
.ok{background:#2f855a} .bad{background:#c05621} .missing{color:#c05621;font-style:italic}
img{max-width:100%;border:1px solid #edf2f7} .meta{color:#4a5568;font-size:13px}
"""


def _html_table(t: List[List[str]], row_class=None) -> str:
    hdr = "".join(f"<th>{html.escape(h)}</th>" for h in t[0])
    body = []
    for i, row in enumerate(t[1:]):
        cls = row_class(i) if row_class else ""
        cells = "".join(f"<td class=\"{'num' if j and _numeric(c) else ''}\">{html.escape(c)}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr class=\"{cls}\">{cells}</tr>")
    return f"<table><thead><tr>{hdr}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _numeric(c: str) -> bool:
    return bool(c) and (c[0].isdigit() or c[0] in "+-–")


def _img(plots, name, alt) -> str:
    if name not in plots:
        return ""
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(plots[name]).decode()}"></p>'


def _missing(section: str) -> str:
    return f'<p class="missing">No {html.escape(section)} recorded in this run.</p>'


def render_html(norm, plots: Dict[str, bytes]) -> str:
    """A single self-contained HTML page (inline CSS, base64 images, no scripts or external requests)."""
    run = norm["run"]
    title = run.get("name") or run.get("model") or "prunekit run"
    if norm["complete"]:
        status = '<span class="badge ok">COMPLETE</span>'
    else:
        why = [] if norm["marker_found"] else ["no COMPLETE marker (interrupted or still running)"]
        if norm["missing"]:
            why.append("missing sections: " + ", ".join(norm["missing"]))
        status = f'<span class="badge bad">INCOMPLETE</span> <span class="missing">{html.escape("; ".join(why))}</span>'
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(str(title))} – prunekit report"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(str(title))}</h1><p>{status}</p>"]
    if run:
        parts.append('<p class="meta">' + " · ".join(f"<b>{html.escape(str(k))}</b>: {html.escape(str(v))}"
                                                     for k, v in run.items()) + "</p>")
    parts.append("<h2>Summary</h2>")
    t = _summary_table(norm)
    parts.append(_html_table(t) if t else _missing("summary"))
    parts.append("<h2>Quality vs speedup over pruning steps</h2>")
    parts.append(_img(plots, "curve", "quality vs speedup") or _missing("pruning steps"))
    st = _steps_table(norm)
    if st:
        parts.append(_html_table(st))
    parts.append("<h2>Per-slice deltas</h2>")
    sl = _slice_table(norm)
    if sl:
        srows = _slice_rows(norm)
        o, p = norm["slices"].get("overall", {}), norm["slices"].get("params", {})
        flagged = [str(r["slice"]) for r in srows if r.get("status") == _FLAG]
        parts.append(f"<p>Overall {html.escape(str(norm['slices'].get('metric', '')))}: {_f(o.get('reference'))} → "
                     f"{_f(o.get('pruned'))} (drop {_f(o.get('drop'))}). A slice is flagged when its drop exceeds "
                     f"{p.get('ratio', 2)}× the overall drop and the {100 * p.get('flag_level', 0.95):.1f}% "
                     f"bootstrap CI of (slice drop − overall drop) excludes 0; slices under "
                     f"{p.get('min_slice_size', 20)} examples are not judged. <b>Flagged: "
                     f"{html.escape(', '.join(flagged) or 'none')}</b></p>")
        parts.append(_img(plots, "slices", "per-slice drops"))
        parts.append(_html_table(sl, lambda i: {_FLAG: "flagged", _FEW: "few"}.get(srows[i].get("status"), "")))
    else:
        parts.append(_missing("per-slice evaluation"))
    parts.append("<h2>Per-layer kept widths</h2>")
    parts.append(_img(plots, "widths", "kept widths") or _missing("layer widths"))
    parts.append("<h2>Environment</h2>")
    env = norm["env"]
    parts.append(_html_table([["key", "value"]] + [[k, _env_value(v)] for k, v in env.items()]) if env
                 else _missing("environment info"))
    parts.append(f'<p class="meta">source: {html.escape(str(norm["source"]))}</p></body></html>')
    return "\n".join(parts)


def _env_value(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return "–" if v is None else str(v)


# ----------------------------------------------------------------------------------------------- Markdown
def _md_table(t: List[List[str]]) -> str:
    lines = ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t[1:]]
    return "\n".join(lines)


def render_markdown(norm, plot_paths: Dict[str, str]) -> str:
    """Markdown version of the report; plots are referenced as files next to it."""
    run = norm["run"]
    out = [f"# {run.get('name') or run.get('model') or 'prunekit run'}", ""]
    if norm["complete"]:
        out.append("**Status: COMPLETE**")
    else:
        out.append("**Status: INCOMPLETE** — " + ("" if norm["marker_found"] else "no COMPLETE marker; ")
                   + (f"missing sections: {', '.join(norm['missing'])}" if norm["missing"] else ""))
    out += ["", "## Summary", ""]
    t = _summary_table(norm)
    out.append(_md_table(t) if t else "_No summary recorded._")
    out += ["", "## Quality vs speedup", ""]
    if "curve" in plot_paths:
        out.append(f"![quality vs speedup]({plot_paths['curve']})")
    st = _steps_table(norm)
    out.append(_md_table(st) if st else "_No pruning steps recorded._")
    out += ["", "## Per-slice deltas", ""]
    sl = _slice_table(norm)
    if sl:
        flagged = [r[0] for r in sl[1:] if r[-1] == _FLAG]
        out.append(f"Flagged slices: **{', '.join(flagged) or 'none'}**")
        out.append("")
        out.append(_md_table([r[:-1] + ([f"**{r[-1]}**"] if r[-1] == _FLAG else [r[-1]]) for r in sl]))
        if "slices" in plot_paths:
            out += ["", f"![per-slice drops]({plot_paths['slices']})"]
    else:
        out.append("_No per-slice evaluation recorded._")
    out += ["", "## Per-layer kept widths", ""]
    if norm["widths"]:
        out.append(f"![kept widths]({plot_paths.get('widths', '')})")
        out.append("")
        out.append(_md_table([["layer", "original", "kept"]] +
                             [[w["name"], _f(w.get("original")), _f(w.get("kept"))] for w in norm["widths"]]))
    else:
        out.append("_No layer widths recorded._")
    out += ["", "## Environment", ""]
    env = norm["env"]
    out.append(_md_table([["key", "value"]] + [[k, _env_value(v)] for k, v in env.items()]) if env
               else "_No environment info recorded._")
    return "\n".join(out) + "\n"

"""Normalized run data (prunekit.report.data) + PNG plots (prunekit.report.plots) -> HTML and Markdown."""
from __future__ import annotations

import base64
import html
from typing import Any, Dict, List, Optional, Tuple

from .plots import FEW as _FEW
from .plots import FLAG as _FLAG
from .plots import plot_name


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
    if kind == "%":
        return f"{100 * v:.1f}%"
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


def _llamacpp_table(norm) -> Optional[List[List[str]]]:
    """GGUF files of the run's export stage in llama.cpp: size, perplexity, prefill/decode tokens/s vs dense."""
    s = norm.get("llamacpp")
    if not s or not s.get("rows"):
        return None
    hdr = ["variant", "dtype", "file", "size", "size vs dense", "perplexity (llama.cpp)", "perplexity (PyTorch)",
           f"prefill tok/s ({s.get('prompt_tokens')} tokens)", "prefill vs dense",
           f"decode tok/s ({s.get('decode_tokens')} tokens)", "decode vs dense"]
    body = []
    for r in s["rows"]:
        if r.get("note"):
            body.append([str(r.get("variant", "")), r["note"]] + ["–"] * (len(hdr) - 2))
            continue
        body.append([str(r.get("variant")), str(r.get("dtype")), str(r.get("file")), _f(r.get("size_bytes"), "bytes"),
                     _f(r.get("size_ratio"), "x"), _f(r.get("perplexity")), _f(r.get("pytorch_perplexity")),
                     _f(r.get("prefill_tok_s")), _f(r.get("prefill_speedup"), "x"), _f(r.get("decode_tok_s")),
                     _f(r.get("decode_speedup"), "x")])
    return [hdr] + body


LLAMACPP_TITLE = "llama.cpp (GGUF export)"


def _llamacpp_meta(norm) -> str:
    s = norm["llamacpp"]
    return (f"{s.get('threads')} threads, median of {s.get('reps')} interleaved runs, perplexity on "
            f"{s.get('windows')} validation windows; speed ratios against the dense model's GGUF of the same dtype")


def _slice_rows(comparison: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return list((comparison or {}).get("slices", []))


def _slice_table(comparison: Optional[Dict[str, Any]]) -> Optional[List[List[str]]]:
    rows = _slice_rows(comparison)
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


def _widths_table(norm) -> Optional[List[List[str]]]:
    """Absolute counts behind the kept-fraction plot: per layer, then a total per unit kind."""
    if not norm["widths"]:
        return None
    hdr = ["layer", "kind", "original", "kept", "kept fraction"]
    body = [[w["name"], w["kind"], _f(w.get("original"), "int"), _f(w["kept"], "int"), _f(w.get("fraction"), "%")]
            for w in norm["widths"]]
    body += [[f"all {k['kind']} ({k['layers']} layers)", k["kind"], _f(k["original"], "int"), _f(k["kept"], "int"),
              _f(k.get("fraction"), "%")] for k in norm["width_kinds"]]
    return [hdr] + body


def _flag_rule(comparison: Dict[str, Any]) -> Tuple[str, str]:
    """(overall numbers + the flagging rule, the flagged slices joined or 'none') of one slice comparison."""
    o, p = comparison.get("overall", {}), comparison.get("params", {})
    flagged = [str(r["slice"]) for r in _slice_rows(comparison) if r.get("status") == _FLAG]
    return (f"Overall {comparison.get('metric', '')}: {_f(o.get('reference'))} → {_f(o.get('pruned'))} "
            f"(drop {_f(o.get('drop'))}). A slice is flagged when its drop exceeds {p.get('ratio', 2)}× the overall "
            f"drop and the {100 * p.get('flag_level', 0.95):.1f}% bootstrap CI of (slice drop − overall drop) "
            f"excludes 0; slices under {p.get('min_slice_size', 20)} examples are not judged."), \
        ", ".join(flagged) or "none"


def _steps_table(norm) -> Optional[List[List[str]]]:
    steps = norm["steps"]
    if not steps:
        return None
    extra = [k for k in steps[0] if k not in ("step", "speedup", "quality")]
    hdr = ["step", "speedup", "quality"] + extra
    return [hdr] + [[str(s.get("step")), _f(s.get("speedup"), "x"), _f(s.get("quality"))] +
                    [_f(s.get(k)) for k in extra] for s in steps]


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
    parts.append(_slices_html(norm["slices"], plots, "slices") or _missing("per-slice evaluation"))
    if norm["comparisons"]:
        parts.append("<h2>More per-slice comparisons</h2>")
        for c in norm["comparisons"]:
            parts.append(f"<h3>{html.escape(c['title'])}</h3>" + _slices_html(c["comparison"], plots,
                                                                                plot_name(c["name"])))
    parts.append("<h2>Per-layer kept widths</h2>")
    wt = _widths_table(norm)
    parts.append(_img(plots, "widths", "kept fraction per layer") + (_html_table(wt) if wt else "")
                 or _missing("layer widths"))
    lt = _llamacpp_table(norm)
    if lt:
        parts.append(f"<h2>{LLAMACPP_TITLE}</h2><p class=\"meta\">{html.escape(_llamacpp_meta(norm))}</p>"
                     + _html_table(lt))
    if norm["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in norm["notes"]) + "</ul>")
    parts.append("<h2>Environment</h2>")
    env = norm["env"]
    parts.append(_html_table([["key", "value"]] + [[k, _env_value(v)] for k, v in env.items()]) if env
                 else _missing("environment info"))
    parts.append(f'<p class="meta">source: {html.escape(str(norm["source"]))}</p></body></html>')
    return "\n".join(parts)


def _slices_html(comparison: Optional[Dict[str, Any]], plots: Dict[str, bytes], plot: str) -> str:
    """Flag rule + overall numbers, the drop plot and the per-slice table of one slice comparison ("" if empty)."""
    sl = _slice_table(comparison)
    if not sl:
        return ""
    srows = _slice_rows(comparison)
    text, flagged = _flag_rule(comparison)
    return (f"<p>{html.escape(text)} <b>Flagged: {html.escape(flagged)}</b></p>" + _img(plots, plot, "per-slice drops")
            + _html_table(sl, lambda i: {_FLAG: "flagged", _FEW: "few"}.get(srows[i].get("status"), "")))


def _env_value(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    return "–" if v is None else str(v)


# ----------------------------------------------------------------------------------------------- Markdown
def _md_table(t: List[List[str]]) -> str:
    lines = ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t[1:]]
    return "\n".join(lines)


def _slices_md(comparison: Optional[Dict[str, Any]], plot_path: Optional[str]) -> str:
    sl = _slice_table(comparison)
    if not sl:
        return ""
    text, flagged = _flag_rule(comparison)
    out = [text, "", f"Flagged slices: **{flagged}**", "",
           _md_table([r[:-1] + ([f"**{r[-1]}**"] if r[-1] == _FLAG else [r[-1]]) for r in sl])]
    if plot_path:
        out += ["", f"![per-slice drops]({plot_path})"]
    return "\n".join(out)


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
    out.append(_slices_md(norm["slices"], plot_paths.get("slices")) or "_No per-slice evaluation recorded._")
    if norm["comparisons"]:
        out += ["", "## More per-slice comparisons"]
        for c in norm["comparisons"]:
            out += ["", f"### {c['title']}", "", _slices_md(c["comparison"], plot_paths.get(plot_name(c["name"])))]
    out += ["", "## Per-layer kept widths", ""]
    wt = _widths_table(norm)
    if wt:
        if "widths" in plot_paths:
            out += [f"![kept fraction per layer]({plot_paths['widths']})", ""]
        out.append(_md_table(wt))
    else:
        out.append("_No layer widths recorded._")
    lt = _llamacpp_table(norm)
    if lt:
        out += ["", f"## {LLAMACPP_TITLE}", "", _llamacpp_meta(norm), "", _md_table(lt)]
    if norm["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in norm["notes"]]
    out += ["", "## Environment", ""]
    env = norm["env"]
    out.append(_md_table([["key", "value"]] + [[k, _env_value(v)] for k, v in env.items()]) if env
               else "_No environment info recorded._")
    return "\n".join(out) + "\n"

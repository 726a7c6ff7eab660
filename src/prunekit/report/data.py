"""Run data -> the normalized form the renderers draw from (derived ratios, kept fractions, sections in order)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from prunekit.errors import ReportError

DEFAULT_KIND = "units"   # a widths entry without "kind"


def _baseline(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    for r in rows:
        if r.get("variant") == "dense":
            return r
    return rows[0] if rows else None


def _width_entries(w) -> List[Dict[str, Any]]:
    """Accept [{"name","original","kept"[,"kind"]}], {name: {"original","kept"[,"kind"]}} or {name: [original, kept]}."""
    if not w:
        return []
    if isinstance(w, dict):
        return [{"name": k, **v} if isinstance(v, dict) else {"name": k, "original": v[0], "kept": v[1]}
                for k, v in w.items()]
    return [dict(x) for x in w]


def width_fractions(widths) -> Dict[str, Any]:
    """Per-layer kept fractions, grouped by unit kind.

    Why fractions: one model mixes units of very different counts (12 attention heads next to 1536 FFN
    neurons), so absolute widths on one axis hide the small ones; kept / original is comparable across kinds.
    Returns {"layers": [{"name", "kind", "original", "kept", "fraction"}] ordered by kind (kinds in order of
    first appearance, layers in recorded order within a kind), "kinds": [{"kind", "layers", "original",
    "kept", "fraction"}] totals per kind}. Entries without "kind" get "units"; fraction is None when the
    original width is unknown or 0."""
    layers, kinds = [], {}
    for e in _width_entries(widths):
        if e.get("kept") is None:
            continue
        if e.get("original") is not None and e["kept"] > e["original"]:
            raise ReportError(f"widths entry '{e.get('name')}' keeps {e['kept']} of {e['original']} units; "
                              f"kept must not exceed original (check how the widths section was recorded)")
        kind = str(e.get("kind") or DEFAULT_KIND)
        orig = e.get("original")
        layers.append({"name": str(e.get("name")), "kind": kind, "original": orig, "kept": e["kept"],
                       "fraction": e["kept"] / orig if orig else None})
        kinds.setdefault(kind, []).append(layers[-1])
    ordered = [x for k in kinds for x in kinds[k]]
    totals = []
    for k, xs in kinds.items():
        orig = sum(x["original"] or 0 for x in xs)
        kept = sum(x["kept"] for x in xs if x["original"])
        totals.append({"kind": k, "layers": len(xs), "original": orig, "kept": kept,
                       "fraction": kept / orig if orig else None})
    return {"layers": ordered, "kinds": totals}


def _comparisons(c) -> List[Dict[str, Any]]:
    """Extra slice comparisons -> [{"name", "title", "comparison"}].

    Accepts what RunRecorder.add_comparison records ({name: {"title", "comparison"}}), {name: comparison}, or
    the normalized list itself (a report's own metrics.json can be rendered again)."""
    if isinstance(c, dict):
        c = [{"name": k, **v} if isinstance(v, dict) and "comparison" in v else {"name": k, "comparison": v}
             for k, v in c.items()]
    return [{"name": str(x["name"]), "title": str(x.get("title") or x["name"]), "comparison": x["comparison"]}
            for x in c or [] if x.get("comparison")]


def normalize(data: Dict[str, Any]) -> Dict[str, Any]:
    """Fill in derived numbers (speedup, size and param reduction vs the baseline, kept fractions per unit kind)
    and put sections in order."""
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
    fractions = width_fractions(data.get("widths"))
    return {
        "run": data.get("run") or {}, "complete": bool(data.get("complete")),
        "missing": list(data.get("missing", [])), "marker_found": bool(data.get("marker_found")),
        "source": data.get("source", ""), "summary": summary or None, "steps": steps,
        "slices": data.get("slices") or None, "widths": fractions["layers"], "width_kinds": fractions["kinds"],
        "comparisons": _comparisons(data.get("comparisons")), "notes": [str(n) for n in data.get("notes") or []],
        "env": data.get("env") or None, "llamacpp": data.get("llamacpp") or None,
    }

"""Run reports: one self-contained report.html, a report.md and a metrics.json from a run directory.

Run directory convention (what a pipeline writes; `RunRecorder` writes it for you)::

    run_dir/
      metrics.json     one JSON object, rewritten atomically after every update; every key is optional:
        "run":     {"name": str, "model": str, "method": str, ...}          free-form description
        "summary": {"metric": "accuracy", "higher_is_better": true, "batch_size": 1,
                    "rows": [{"variant": "dense" | "pruned" | "pruned+int8" | ..., "quality": float,
                              "latency_ms": float, "memory_bytes": int, "size_bytes": int, "params": int}]}
                   the first row is the baseline for speedups (or the row named "dense")
        "steps":   [{"step": int, "speedup": float, "quality": float, ...extra numbers}]   one per pruning step
        "slices":  SliceComparison.to_dict() from prunekit.evaluate.compare_slices
        "widths":  [{"name": str, "kind": str, "original": int, "kept": int}]  per prunable layer/group; kind
                   is the unit ("heads", "FFN neurons", "channels", ...): the report plots kept / original
                   per layer, coloured by kind, and tables the counts
        "comparisons": {name: {"title": str, "comparison": SliceComparison.to_dict()}}   optional, more
                   slice comparisons (RunRecorder.add_comparison), each shown like "slices"
        "notes":   [str]                                                      optional, how things were measured
        "env":     prunekit.measure.environment_info()
      COMPLETE         empty marker file written last, when the run finished

A run without COMPLETE (interrupted, still running) or with missing sections still gets a report: it is
marked "INCOMPLETE" at the top and lists which sections are missing; everything that exists is shown.

    write_report("runs/vit-50pct", "runs/vit-50pct/report")    # or write_report(data_dict, out_dir)
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Union

from .recorder import load_run
from .data import normalize
from .plots import make_plots
from .render import render_html, render_markdown


def write_report(run_dir_or_data: Union[str, os.PathLike, Dict[str, Any]], out_dir: Union[str, os.PathLike]
                 ) -> Dict[str, str]:
    """Write report.html (self-contained, plots as base64 PNG), report.md (+ plots/*.png) and metrics.json.

    run_dir_or_data: a run directory (see module docstring), a path to its metrics.json, or the same data as a
    dict (a dict counts as complete unless it says `"complete": false` or lacks sections).
    Returns {"html": path, "md": path, "json": path}.
    """
    data = load_run(run_dir_or_data)
    norm = normalize(data)
    os.makedirs(out_dir, exist_ok=True)
    plots = make_plots(norm)
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    for name, png in plots.items():
        with open(os.path.join(plot_dir, f"{name}.png"), "wb") as f:
            f.write(png)
    paths = {"html": os.path.join(out_dir, "report.html"), "md": os.path.join(out_dir, "report.md"),
             "json": os.path.join(out_dir, "metrics.json")}
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write(render_html(norm, plots))
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(render_markdown(norm, {k: f"plots/{k}.png" for k in plots}))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(norm, f, indent=1, allow_nan=False, default=str)
    return paths

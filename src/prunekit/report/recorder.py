"""Writing and reading run directories (layout documented in `prunekit.report`)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Dict, Mapping, Optional, Union

from prunekit.errors import ReportError
from prunekit.measure.env import environment_info

SECTIONS = ("summary", "steps", "slices", "widths", "env")   # a run without one of these is reported incomplete
OPTIONAL_SECTIONS = ("comparisons", "notes", "llamacpp")      # extra slice comparisons, notes, GGUF in llama.cpp
METRICS = "metrics.json"
COMPLETE = "COMPLETE"


def _clean(v):
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, objects with to_dict() -> dicts."""
    if hasattr(v, "to_dict") and callable(v.to_dict):
        v = v.to_dict()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        try:
            return _clean(v.item())
        except (ValueError, RuntimeError):
            pass
    return v


class RunRecorder:
    """Incrementally writes a run directory so an interrupted run still leaves a readable metrics.json.

        rec = RunRecorder("runs/exp1", run={"model": "vit_b_16", "method": "Structured(0.5)"})
        rec.log_step(step=1, speedup=1.3, quality=0.81)
        rec.set("summary", {...}); rec.set("slices", comparison); rec.set("widths", [...])
        rec.add_comparison("by_length", comparison2, title="Accuracy by input length")   # optional extras
        rec.add_note("Latency: batch 32, 1 thread, median of 15 interleaved reps.")
        rec.finish()   # writes COMPLETE
    Every call rewrites metrics.json atomically (temp file + rename), so readers never see half a file.
    """

    def __init__(self, run_dir: Union[str, os.PathLike], run: Optional[Dict[str, Any]] = None, env: bool = True):
        self.run_dir = str(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        marker = os.path.join(self.run_dir, COMPLETE)
        if os.path.exists(marker):
            os.remove(marker)  # a restarted run is not complete until it finishes again
        self.data: Dict[str, Any] = {"run": _clean(run or {})}
        if env:
            self.data["env"] = environment_info()
        self._write()

    def set(self, section: str, value: Any) -> "RunRecorder":
        known = SECTIONS + OPTIONAL_SECTIONS + ("run",)
        if section not in known:
            raise ReportError(f"unknown run section '{section}' passed to RunRecorder.set; use one of {list(known)}")
        self.data[section] = _clean(value)
        self._write()
        return self

    def log_step(self, **numbers) -> "RunRecorder":
        """Append one pruning step ({step, speedup, quality, ...})."""
        missing = {"step", "speedup", "quality"} - set(numbers)
        if missing:
            raise ReportError(f"log_step needs step, speedup and quality; missing {sorted(missing)}")
        self.data.setdefault("steps", []).append(_clean(numbers))
        self._write()
        return self

    def add_comparison(self, name: str, comparison: Any, title: Optional[str] = None) -> "RunRecorder":
        """Record one more slice comparison (e.g. a second evaluation); the report gives each its own
        subsection with the same plot and table as the main "slices" section, titled `title` (default: name)."""
        if not isinstance(name, str) or not name:
            raise ReportError(f"add_comparison needs a non-empty name string, got {name!r}")
        self.data.setdefault("comparisons", {})[name] = {"title": title or name, "comparison": _clean(comparison)}
        self._write()
        return self

    def add_note(self, text: str) -> "RunRecorder":
        """Record one line on how something was measured; the report lists them under "Notes"."""
        self.data.setdefault("notes", []).append(str(text))
        self._write()
        return self

    def finish(self) -> None:
        """Mark the run complete (write the COMPLETE marker after the last metrics.json update)."""
        self._write()
        open(os.path.join(self.run_dir, COMPLETE), "w").close()

    def _write(self):
        fd, tmp = tempfile.mkstemp(dir=self.run_dir, prefix=".metrics.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1, allow_nan=False)
        os.replace(tmp, os.path.join(self.run_dir, METRICS))


def load_run(src: Union[str, os.PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """Run data as a dict with "complete" (bool) and "missing" (absent sections) filled in."""
    if isinstance(src, Mapping):
        data = _clean(dict(src))
        complete = data.get("complete", True) is not False
        source = "<dict>"
    else:
        path = str(src)
        run_dir = os.path.dirname(path) if path.endswith(".json") else path
        mpath = path if path.endswith(".json") else os.path.join(path, METRICS)
        if not os.path.isdir(run_dir):
            raise ReportError(f"run directory {run_dir} does not exist")
        data = {}
        if os.path.exists(mpath):
            try:
                with open(mpath) as f:
                    data = json.load(f)
            except json.JSONDecodeError as e:
                raise ReportError(f"{mpath} is not valid JSON ({e}); was it written atomically? "
                                  f"RunRecorder writes it safely") from e
            if not isinstance(data, dict):
                raise ReportError(f"{mpath} must hold a JSON object, found {type(data).__name__}")
        complete = os.path.exists(os.path.join(run_dir, COMPLETE))
        source = run_dir
    missing = [s for s in SECTIONS if not data.get(s)]
    data["complete"] = bool(complete and not missing)
    data["missing"] = missing
    data["marker_found"] = complete
    data["source"] = source
    return data

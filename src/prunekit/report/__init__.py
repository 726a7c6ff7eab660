"""Reports: report.html / report.md / metrics.json from a run directory (see write.py for the layout).
"""
from prunekit.report.recorder import SECTIONS, RunRecorder, load_run
from prunekit.report.write import write_report

__all__ = ["SECTIONS", "RunRecorder", "load_run", "write_report"]

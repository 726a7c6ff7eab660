"""Reports: report.html / report.md / metrics.json from a run directory (see write.py for the layout).
"""
from prunekit.report.data import width_fractions
from prunekit.report.recorder import OPTIONAL_SECTIONS, SECTIONS, RunRecorder, load_run
from prunekit.report.write import write_report

__all__ = ["SECTIONS", "OPTIONAL_SECTIONS", "RunRecorder", "load_run", "width_fractions", "write_report"]

"""prunekit: prune trained PyTorch models into smaller dense models, recover, evaluate, export.

The pipeline, one subpackage per step (docs/architecture.md has the map):

    graph/ -> structured/ | sparse/ | layers/ -> recover/ -> evaluate/ + measure/ -> report/ -> io/ + export/
                                           run/ drives them as schedules and YAML recipes; cli.py is the command

Everything a user needs is importable from here; optional dependencies (transformers, matplotlib, onnx) are
imported only by the functions that use them.
"""
from prunekit.api import PruneResult, prune
from prunekit.config import Config, config_from_dict
from prunekit.errors import (
    CalibrationDataError,
    CompareError,
    ConfigError,
    DataError,
    ExportError,
    GraphError,
    InputTypeError,
    LoadError,
    MetricError,
    PrunekitError,
    RecoveryDiverged,
    ReportError,
    RunError,
    SaveError,
    UnsupportedHardwareError,
)
from prunekit.evaluate import EvalResult, SliceComparison, TokenWindows, compare_slices, evaluate
from prunekit.graph import DependencyGraph
from prunekit.io import load, save
from prunekit.layers import Layers
from prunekit.measure import (
    count_macs,
    count_params,
    decode_tokens_per_s,
    environment_info,
    measure_latency,
    model_stats,
    peak_memory,
    prefill_latency,
    size_on_disk,
)
from prunekit.plan import Plan
from prunekit.recover import Recover, RecoverResult, TeacherCache, precompute_teacher, recover, resume
from prunekit.run.pipeline import Recipe, load_recipe, run_pipeline
from prunekit.run.executor import run_schedule
from prunekit.run.schedule import EvalStage, Gradual, Iterative, OneShot
from prunekit.sparse import Sparse
from prunekit.structured import (
    Activation,
    BNScale,
    Experts,
    Fluctuation,
    Latency,
    MACs,
    Magnitude,
    Params,
    Random,
    Structured,
    Taylor,
)
from prunekit.version import __version__

# Names whose modules import heavy optional packages (matplotlib, onnx, gguf): loaded on first use.
_LAZY = {
    "export_onnx": "prunekit.export.onnx",
    "export_gguf": "prunekit.export.gguf",
    "quantize_int8": "prunekit.export.quantize",
    "semi_structured_2to4": "prunekit.export.quantize",
    "write_report": "prunekit.report.write",
    "RunRecorder": "prunekit.report.recorder",
}

__all__ = [
    # the verb and its result
    "prune", "PruneResult", "Plan", "Config", "config_from_dict", "DependencyGraph",
    # what to remove
    "Structured", "MACs", "Params", "Latency", "Sparse", "Layers", "Experts",
    # how to score it
    "Magnitude", "Taylor", "Activation", "BNScale", "Fluctuation", "Random",
    # schedules and recipes
    "Iterative", "Gradual", "OneShot", "EvalStage", "run_schedule", "Recipe", "load_recipe", "run_pipeline",
    # recovery
    "recover", "Recover", "RecoverResult", "resume", "precompute_teacher", "TeacherCache",
    # evaluation and measurement
    "evaluate", "compare_slices", "EvalResult", "SliceComparison", "TokenWindows", "measure_latency",
    "peak_memory", "size_on_disk", "count_params", "count_macs", "model_stats", "prefill_latency",
    "decode_tokens_per_s", "environment_info",
    # files, export, report
    "save", "load", *_LAZY,
    # errors
    "PrunekitError", "ConfigError", "InputTypeError", "GraphError", "LoadError", "SaveError", "RunError",
    "DataError", "ExportError",
    "UnsupportedHardwareError", "RecoveryDiverged", "CalibrationDataError", "MetricError", "CompareError",
    "ReportError",
    "__version__",
]


def __getattr__(name):
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:                                  # submodules: pk.data, pk.zoo, pk.sparse, ... on first use
        return importlib.import_module(f"prunekit.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"prunekit.{name}":
            raise
    raise AttributeError(f"module 'prunekit' has no attribute '{name}'")

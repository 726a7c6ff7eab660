"""prunekit: prune trained PyTorch models into smaller dense models, recover, evaluate, export."""
from .config import Config, ConfigError, config_from_dict
from .api import PruneResult, prune
from .graph import DependencyGraph, GraphError, Group
from .structured import MACs, Params, Structured
from .layers import Layers
from .sparse import Sparse
from .importance import Activation, BNScale, Fluctuation, Magnitude, Random, Taylor
from .latency import Latency
from .schedule import Evaluate, Gradual, Iterative, OneShot, run_schedule
from .pipeline import Recipe, load_recipe, run_pipeline
from .flops import count_macs, count_params
from .io import LoadError, load, save
from .evaluate import EvalResult, SliceComparison, TokenWindows, compare, compare_slices, evaluate
from .measure import (decode_tokens_per_s, environment_info, measure_latency, model_stats, param_count,
                      peak_memory, prefill_latency, size_on_disk)
from .export import ExportError, UnsupportedHardwareError, export_onnx, quantize_int8, semi_structured_2to4
from .report import RunRecorder, write_report
from .recover import Recover, RecoverResult, RecoveryDiverged, recover
from .runs import Run, RunError, resume
from .zoo import fashion_mnist_cnn, resolve_model
from . import calibrate, data, importance, runs, sparse, zoo

__version__ = "0.1.0"

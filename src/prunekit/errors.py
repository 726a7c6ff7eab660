"""Every error prunekit raises for bad input or a failed check derives from `PrunekitError`.

Each message is one line: what was wrong, where (module name, argument, file), and what to do. The CLI prints
that line and exits with status 2; anything that is not a `PrunekitError` is a bug and keeps its traceback.
The subclasses also derive from the builtin a caller would have caught before (ValueError / RuntimeError).
"""
from __future__ import annotations

from typing import Optional

__all__ = ["PrunekitError", "ConfigError", "InputTypeError", "CalibrationDataError", "LoadError", "SaveError",
           "RunError", "ExportError",
           "UnsupportedHardwareError", "DataError", "GraphError", "VerificationError", "RecoveryDiverged", "CompareError",
           "MetricError", "ReportError"]


class PrunekitError(Exception):
    """Base of every error prunekit raises on purpose (bad input, failed verification, unusable file)."""


class ConfigError(PrunekitError, ValueError):
    """A config field has a wrong name, type or value. The message names the field and what to do."""


class InputTypeError(PrunekitError, TypeError):
    """An argument has the wrong type (a model that is not an nn.Module, batches of an unusable form, ...)."""


class CalibrationDataError(PrunekitError, ValueError):
    """Calibration data is missing, empty, or has the wrong type/shape. Raised before any weight changes."""


class LoadError(PrunekitError, RuntimeError):
    """A saved prunekit directory is missing files, corrupt, or does not fit the given model."""


class SaveError(PrunekitError, OSError):
    """A save could not be completed (disk full, unwritable or foreign target); the previous save is unchanged."""


class RunError(PrunekitError, RuntimeError):
    """A run directory is missing, incomplete, or does not match what the caller is resuming."""


class ExportError(PrunekitError, RuntimeError):
    """Export or its verification failed. `.op` names the operator involved when it could be identified."""

    def __init__(self, message: str, op: Optional[str] = None):
        super().__init__(message)
        self.op = op


class UnsupportedHardwareError(PrunekitError, RuntimeError):
    """The requested kernel needs hardware this machine does not have."""


class DataError(PrunekitError, RuntimeError):
    """A dataset is missing, a spec cannot be resolved, or a batch has a form prunekit cannot read; the
    message says what to install or change."""


class GraphError(PrunekitError, RuntimeError):
    """The dependency graph could not be built (an op prunekit does not understand, an untraceable model)."""


class VerificationError(GraphError):
    """A structured cut changed what the model computes: the pruned model's outputs differ from the dense
    model's with the removed channels zeroed. The message names the first diverging module and the `ignore=`."""


class RecoveryDiverged(PrunekitError, RuntimeError):
    """The loss or gradient became NaN/inf. `.model` holds the restored last good weights, `.result` the
    RecoverResult (status "diverged")."""

    def __init__(self, message: str, model, result):
        super().__init__(message)
        self.model, self.result = model, result


class CompareError(PrunekitError, ValueError):
    """The two evaluations cannot be compared example by example."""


class MetricError(PrunekitError, ValueError):
    """Data or model output does not fit the metric. The message says what was expected."""


class ReportError(PrunekitError, ValueError):
    """The run data cannot be read; the message says which file/key and what was expected."""

"""TODO"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.batch import call_model, eval_mode, split_batch
from prunekit.data import load
from prunekit.errors import CalibrationDataError, InputTypeError

# --------------------------------------------------------------------------------------------- calibration


def default_loss(output: Any, targets: Any) -> torch.Tensor:
    """Cross-entropy on logits when targets are given, else the output's own `.loss` (Hugging Face models
    called with labels). Anything else needs an explicit `loss_fn`."""
    if targets is not None:
        logits = logits_of(output)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    loss = model_loss(output)
    if loss is None:
        raise CalibrationDataError("Taylor/sensitivity: the calibration batches have no targets and the model output "
                                   "has no .loss; pass loss_fn=lambda output, targets: ... or batches of (inputs, "
                                   "targets)")
    return loss


def calibration_batches(data, n: Optional[int]) -> list:
    if data is None:
        raise CalibrationDataError("this importance criterion is data-aware: give it calibration batches, e.g. "
                                   "Taylor(data=prunekit.data.load('fashion-mnist', limit=512)) (a recipe gets the "
                                   "run's calibration data automatically)")
    if isinstance(data, str):
        data = load(data, split="train")
    out = []
    for b in data:
        if n is not None and len(out) >= n:
            break
        out.append(b)
    if not out:
        raise CalibrationDataError("the calibration data holds no batches")
    return out


def batch_loss(model: nn.Module, batch, loss_fn: Optional[Callable] = None) -> torch.Tensor:
    inputs, targets = split_batch(batch)
    out = call_model(model, inputs)
    return (loss_fn or default_loss)(out, targets)


def mean_loss(model: nn.Module, batches: list, loss_fn: Optional[Callable] = None) -> float:
    """Mean calibration loss in eval mode without gradients (BatchNorm statistics untouched)."""
    with eval_mode(model), torch.no_grad():
        return float(sum(float(batch_loss(model, b, loss_fn)) for b in batches) / len(batches))


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, an object with `.logits` (Hugging Face), a dict with
    "logits", or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and output.logits is not None:
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputTypeError(f"cannot find logits in a model output of type {type(output).__name__}; return a tensor, "
                         f"a tuple starting with logits, or an object with a .logits attribute")


def model_loss(output: Any) -> Optional[torch.Tensor]:
    """The loss a model computed itself (Hugging Face `.loss` / `["loss"]` when given `labels`), or None."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    return loss


def task_loss(output: Any, targets: Any) -> torch.Tensor:
    """Cross-entropy of the logits against integer targets ([B] or [B, L] with -100 ignored); without
    targets, the `.loss` a Hugging Face model computed from `labels` in its inputs."""
    if targets is None:
        loss = model_loss(output)
        if loss is None:
            raise CalibrationDataError("loss='task' or 'mixed' needs targets: give batches as (inputs, targets), or "
                                       "inputs with 'labels' so the model returns .loss")
        return loss
    logits = logits_of(output)
    if logits.dim() > 2:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
    return F.cross_entropy(logits.float(), targets)

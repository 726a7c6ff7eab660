"""Pieces both recovery loops share (batch-epoch `loop.py`, token-budget `tokens.py`): the learning-rate
schedule, AdamW parameter groups, LoRA wrapping and the loss-mode check."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional

import torch.nn as nn

from prunekit.errors import ConfigError
from prunekit.recover.options import Recover


@dataclasses.dataclass
class RecoverResult:
    """What `recover(..., return_result=True)` returns.

    status:  "completed", "stopped" (a callback returned False), or "diverged" (non-finite loss; the model
             holds the weights from before the failing step).
    steps:   optimizer steps taken in total (including before a resume).
    history: one row per finished epoch: {"epoch", "step", "loss"} with the mean global-batch loss.
    """
    model: nn.Module
    status: str
    steps: int
    history: List[Dict[str, float]]
    message: str = ""


def lr_at(step: int, total: int, cfg: Recover) -> float:
    """Linear warm-up from lr/warmup_steps to lr, then cosine decay towards 0 over the remaining steps."""
    warm = int(round(cfg.warmup * total)) if cfg.warmup < 1 else int(cfg.warmup)
    warm = min(warm, total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(student: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Decay matrices/kernels, not biases or norm scales (1-D): the usual AdamW practice."""
    decay, no_decay = [], []
    for _, p in student.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("recover(): the model has no trainable parameters (all requires_grad=False)")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_loss(cfg: Recover, teacher: Optional[nn.Module]) -> str:
    mode = cfg.loss if cfg.loss != "auto" else ("kd" if teacher is not None else "task")
    if mode in ("kd", "mixed") and teacher is None:
        raise ConfigError(f"Recover.loss='{mode}' distills from a teacher: pass teacher=<the unpruned model>")
    if cfg.features and teacher is None:
        raise ConfigError("Recover.features matches intermediate outputs to a teacher's: pass teacher=...")
    return mode


def apply_lora(model: nn.Module, options: Dict[str, Any]) -> nn.Module:
    """Wrap `model` with PEFT LoRA adapters (base weights frozen). lora_alpha defaults to 2 * r."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("Recover.lora needs the peft package: pip install 'prunekit[hf]'") from e
    opts = dict(options)
    opts.setdefault("r", 8)
    opts.setdefault("lora_alpha", 2 * opts["r"])
    try:
        lcfg = LoraConfig(**opts)
    except TypeError as e:
        raise ConfigError(f"Recover.lora={options!r} is not valid for peft.LoraConfig: {e}") from e
    return get_peft_model(model, lcfg)

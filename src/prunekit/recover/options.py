"""`Recover`: the options of `recover()` as a config dataclass, so YAML recipes and run directories can
describe a recovery exactly like they describe a pruning method."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, List, Optional, Union

import torch

from prunekit.config import Config, check_type, register_config
from prunekit.errors import ConfigError

LOSSES = ("auto", "kd", "task", "mixed")
ON_NONFINITE = ("raise", "stop")
PRECISIONS = ("auto", "bf16", "fp32")


@register_config
@dataclasses.dataclass
class Recover(Config):
    """How to fine-tune a pruned model back to its teacher's quality.

    epochs / lr:   passes over the data and peak AdamW learning rate (cosine decay after a linear warm-up).
    loss:          "kd" (distill the teacher's logits), "task" (cross-entropy on targets, or the model's own
                   `.loss`), "mixed" (alpha * kd + (1 - alpha) * task), "auto" (kd if a teacher is given).
    temperature:   softmax temperature of the KD loss; the loss is scaled by T^2 so gradients keep their size.
    features:      module names whose outputs are matched to the teacher's (MSE): a list (same name in both)
                   or {student_name: teacher_name}. Width mismatches get a learned 1x1 projection.
    lora:          PEFT LoraConfig kwargs (e.g. {"r": 8, "target_modules": ["q_proj", "v_proj"]}): train low-rank
                   adapters instead of all weights, merged back into the model at the end.
    checkpoint_every: optimizer steps between checkpoints when `checkpoint_dir` is given (None: each epoch).
    on_nonfinite:  "raise" RecoveryDiverged or "stop" with a warning, after restoring the last good weights.
    strategy:      under torchrun: "ddp" (replicate the model) or "fsdp" (shard parameters, gradients and optimizer
                   state with torch's FSDP2 `fully_shard`, for models that do not fit one device).

    Token-budget recovery of causal LMs (`tokens` set; see recover/tokens.py), where `epochs` does not apply:
    tokens:        training tokens in total; data is packed into `batch_size` x `seq_len` blocks and streamed.
    grad_accum:    micro-batches per optimizer step (the step sees batch_size * grad_accum * seq_len tokens).
    top_k:         KD on the teacher's top-k logits only (renormalized): bounds what is kept per position;
                   None = full-vocabulary KL (top_k = vocab size gives the same loss).
    hidden_weight: weight of a Minitron-style loss on the last hidden state (MSE after RMS normalization),
                   added to the logit loss; 0 = off.
    gradient_checkpointing: recompute activations in backward (HF `gradient_checkpointing_enable`).
    precision:     "auto" (bf16 autocast on a GPU that supports it, fp32 on CPU), "bf16" or "fp32".
    eval_every:    evaluate perplexity on `eval_data` every this many training tokens (None: at the end only).
    teacher_device: run the teacher there instead of on the student's device (e.g. "cpu" to keep a GPU's memory
                   for the student); a precomputed teacher (pk.precompute_teacher) needs no device at all.
    """
    epochs: int = 1
    lr: float = 1e-4
    loss: str = "auto"
    alpha: float = 0.5
    temperature: float = 2.0
    features: Optional[Union[List[str], Dict[str, str]]] = None
    feature_weight: float = 1.0
    lora: Optional[Dict[str, Any]] = None
    weight_decay: float = 0.01
    warmup: float = 0.05
    grad_clip: Optional[float] = 1.0
    max_steps: Optional[int] = None
    shuffle: bool = True
    seed: int = 0
    checkpoint_every: Optional[int] = None
    on_nonfinite: str = "raise"
    strategy: str = "ddp"
    tokens: Optional[int] = None
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    top_k: Optional[int] = None
    hidden_weight: float = 0.0
    gradient_checkpointing: bool = False
    precision: str = "auto"
    eval_every: Optional[int] = None
    teacher_device: Optional[str] = None

    def __post_init__(self):
        o = "Recover"
        check_type(o, "epochs", self.epochs, int, "a positive int")
        if self.epochs < 1:
            raise ConfigError(f"{o}.epochs must be >= 1, got {self.epochs}")
        for name in ("lr", "temperature", "feature_weight", "weight_decay", "warmup", "alpha"):
            check_type(o, name, getattr(self, name), (int, float), "a number")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError(f"{o}.lr and {o}.temperature must be > 0, got lr={self.lr}, temperature={self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{o}.alpha is the KD share of the mixed loss and must be in [0, 1], got {self.alpha}")
        if self.warmup < 0:
            raise ConfigError(f"{o}.warmup must be >= 0 (a fraction of all steps if < 1, else a step count), "
                              f"got {self.warmup}")
        _one_of(o, "loss", self.loss, LOSSES)
        _one_of(o, "on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        _one_of(o, "strategy", self.strategy, ("ddp", "fsdp"))
        _one_of(o, "precision", self.precision, PRECISIONS)
        check_type(o, "hidden_weight", self.hidden_weight, (int, float), "a number >= 0")
        check_type(o, "gradient_checkpointing", self.gradient_checkpointing, bool, "true or false")
        for name in ("seq_len", "batch_size", "grad_accum"):
            check_type(o, name, getattr(self, name), int, "a positive int")
            if getattr(self, name) < 1 or (name == "seq_len" and self.seq_len < 2):
                raise ConfigError(f"{o}.{name} must be >= {2 if name == 'seq_len' else 1}, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "tokens", "top_k", "eval_every"):
            v = getattr(self, name)
            if v is not None:
                check_type(o, name, v, int, "a positive int or None")
                if v < 1:
                    raise ConfigError(f"{o}.{name} must be >= 1 or None, got {v}")
        if self.teacher_device is not None:
            try:
                torch.device(self.teacher_device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"{o}.teacher_device={self.teacher_device!r} is not a device; give e.g. 'cpu', "
                                  f"'cuda:1' or None") from None
        if self.grad_clip is not None:
            check_type(o, "grad_clip", self.grad_clip, (int, float), "a positive number or None")
        if self.features is not None and not isinstance(self.features, (list, tuple, dict)):
            raise ConfigError(f"{o}.features must be a list of module names or a {{student: teacher}} mapping, "
                              f"got {self.features!r}")
        if self.lora is not None and not isinstance(self.lora, dict):
            raise ConfigError(f"{o}.lora must be a dict of peft.LoraConfig arguments, e.g. "
                              f"{{'r': 8, 'target_modules': ['q_proj', 'v_proj']}}, got {self.lora!r}")

    def feature_pairs(self) -> List[tuple]:
        """[(student_module_name, teacher_module_name), ...]"""
        if not self.features:
            return []
        if isinstance(self.features, dict):
            return list(self.features.items())
        return [(n, n) for n in self.features]

    def replace(self, **overrides) -> "Recover":
        """A copy with some fields changed; unknown names raise ConfigError naming the closest field."""
        names = [f.name for f in dataclasses.fields(self)]
        for k in overrides:
            if k not in names:
                close = difflib.get_close_matches(k, names, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"recover() got an unknown option '{k}'.{hint} Recover fields: {names}")
        return dataclasses.replace(self, **overrides)


def _one_of(owner, name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{owner}.{name} must be one of {allowed}, got {value!r}")

"""Loss pieces of recovery: logits extraction, temperature-scaled KD, task loss and feature matching."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.errors import ConfigError, GraphError
from prunekit.objective import logits_of


def _rows(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, C] stays; sequence logits [B, L, V] become [N, V] rows, keeping positions where mask == 1."""
    if logits.dim() <= 2:
        return logits
    flat = logits.reshape(-1, logits.shape[-1])                       # [B*L, V]
    if mask is not None and mask.shape == logits.shape[:-1]:
        flat = flat[mask.reshape(-1).bool()]
    return flat


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(teacher || student) on softmax(logits / T), mean over rows, times T^2.

    The T^2 factor keeps gradient magnitudes independent of T (Hinton et al. 2015), so `lr` and `alpha`
    mean the same thing whatever temperature is chosen."""
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"KD needs student and teacher logits of one shape, got {tuple(student_logits.shape)} vs "
                          f"{tuple(teacher_logits.shape)}; was the output layer pruned? Keep it, or use loss='task'.")
    s = _rows(student_logits, mask).float() / temperature
    t = _rows(teacher_logits, mask).float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def topk_kd_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_index: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """KD against the teacher's top-k tokens plus one "rest of the vocabulary" bucket, times T^2.

    teacher_logp / teacher_index [..., k]: the teacher's k largest log-probabilities at temperature T
    (log_softmax(logits / T).topk(k)) and their token ids. Both distributions are reduced to k + 1 outcomes
    (the k tokens, and everything else with mass 1 - sum) and compared with KL(teacher || student), so the
    student is not pushed to zero outside the top k; with k = vocab size this is exactly `kd_loss`. A
    precomputed or offloaded teacher keeps 2k numbers per position instead of the vocabulary (49k for SmolLM2)."""
    s = _rows(student_logits, None).float() / temperature                       # [N, V]
    t_lp = teacher_logp.reshape(-1, teacher_logp.shape[-1]).float()              # [N, k]
    ti = teacher_index.reshape(-1, teacher_index.shape[-1])
    if s.shape[0] != t_lp.shape[0]:
        raise ConfigError(f"top-k KD: {s.shape[0]} student positions vs {t_lp.shape[0]} teacher positions")
    s_lp = F.log_softmax(s, -1).gather(-1, ti)                                 # [N, k]
    t_p = t_lp.exp()
    head = (t_p * (t_lp - s_lp)).sum(-1)
    eps = 1e-12
    t_rest = (1 - t_p.sum(-1)).clamp_min(0)
    s_rest = (1 - s_lp.exp().sum(-1)).clamp_min(0)
    tail = t_rest * (torch.log(t_rest + eps) - torch.log(s_rest + eps))
    return (head + tail).mean() * temperature ** 2


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM: logits [B, L, V] at position i predict ids[:, i + 1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Minitron-style hidden-state loss: MSE between RMS-normalized last hidden states [B, L, H].

    Normalizing first makes the loss scale-free, so one weight works across models and depths."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ConfigError(f"hidden-state loss needs equal shapes, got student {tuple(student_hidden.shape)} vs "
                         f"teacher {tuple(teacher_hidden.shape)} (was the hidden size pruned?); set hidden_weight=0")
    def norm(x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return F.mse_loss(norm(student_hidden), norm(teacher_hidden))


def _feature_dim(x: torch.Tensor) -> int:
    """Channel dim of a feature map: 1 for conv maps [B, C, H, W], last otherwise ([B, C] / [B, T, C])."""
    return 1 if x.dim() == 4 else x.dim() - 1


def make_projection(student_feat: torch.Tensor, teacher_feat: torch.Tensor, where: str) -> nn.Module:
    """Identity when widths agree, else a learned bias-free 1x1 conv / linear map student -> teacher width.

    Only the channel width may differ (pruning removes channels, not positions); anything else is an error."""
    d = _feature_dim(teacher_feat)
    s_shape, t_shape = list(student_feat.shape), list(teacher_feat.shape)
    if student_feat.dim() != teacher_feat.dim() or s_shape[:d] + s_shape[d + 1:] != t_shape[:d] + t_shape[d + 1:]:
        raise ConfigError(f"feature loss at {where}: student output {tuple(s_shape)} and teacher output "
                          f"{tuple(t_shape)} differ in more than the channel dimension; pick other modules")
    cs, ct = s_shape[d], t_shape[d]
    if cs == ct:
        return nn.Identity()
    if student_feat.dim() == 4:
        return nn.Conv2d(cs, ct, 1, bias=False)
    return nn.Linear(cs, ct, bias=False)


def feature_loss(student_feats: List[torch.Tensor], teacher_feats: List[torch.Tensor]) -> torch.Tensor:
    """Mean over matched module pairs of MSE(projected student output, teacher output)."""
    losses = [F.mse_loss(s.float(), t.float()) for s, t in zip(student_feats, teacher_feats)]
    return torch.stack(losses).mean()


class FeatureTap:
    """Forward hooks that record the outputs of named submodules during one forward pass."""

    def __init__(self, model: nn.Module, names: List[str], who: str):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            import difflib
            hints = {n: difflib.get_close_matches(n, list(modules), n=1) for n in missing}
            raise ConfigError(f"{who} has no modules {missing} for the feature loss (closest: {hints}); names come "
                              f"from model.named_modules()")
        self.names = names
        self.outputs: Dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def fn(_module, _inputs, output):
            self.outputs[name] = logits_of(output) if not isinstance(output, torch.Tensor) else output
        return fn

    def take(self) -> List[torch.Tensor]:
        """Outputs of the last forward, in `names` order (and forget them)."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise GraphError(f"modules {missing} did not run in the forward pass; the feature loss cannot use them")
        out = [self.outputs[n] for n in self.names]
        self.outputs.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

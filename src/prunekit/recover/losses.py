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

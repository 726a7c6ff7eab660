"""Sparsity masks as `torch.nn.utils.parametrize` parametrizations.

`module.weight` becomes `original * mask`: reading it shows the zeros, the forward uses them, and the
gradient reaching `original` is multiplied by the mask, so fine-tuning cannot revive pruned weights (and even
an optimizer that moves `original` -- weight decay, momentum -- leaves `module.weight` zero there).
`bake(model)` removes the parametrizations, leaving plain `weight` Parameters that hold the zeros.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = ["SparseMask", "is_linear_like", "weight_2d", "apply_mask", "bake", "masks", "sparsity_stats"]


class SparseMask(nn.Module):
    """Parametrization W -> W * mask with a boolean buffer `mask` in the parameter's own layout."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W * self.mask

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, density={self.mask.float().mean().item():.3f}"


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: a linear layer whose weight is stored as (in, out))."""
    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, torch.Tensor) and w.dim() == 2


def _transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)            # Conv1D stores (in, out)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The effective weight (masked, if parametrized) as (out_features, in_features)."""
    W = module.weight
    return W.t() if _transposed(module) else W


def _mask_of(module: nn.Module) -> Optional[SparseMask]:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, SparseMask):
            return p
    return None


@torch.no_grad()
def apply_mask(module: nn.Module, keep: torch.Tensor, new_weight: Optional[torch.Tensor] = None) -> None:
    """Make `module.weight` sparse with the keep mask `keep` (out, in).

    new_weight (out, in): replacement values for the kept weights (SparseGPT's reconstruction); by default the
    current values are kept. The stored original is zeroed where pruned so raw state_dicts and `bake` agree.
    A module that already has a mask gets the intersection of old and new masks."""
    if _transposed(module):
        keep = keep.t()
        new_weight = None if new_weight is None else new_weight.t()
    existing = _mask_of(module)
    if existing is not None:
        keep = keep.to(existing.mask.device) & existing.mask
        existing.mask.copy_(keep)
        target = module.parametrizations["weight"].original
    else:
        target = module.weight
    keep = keep.to(target.device)
    values = target if new_weight is None else new_weight.to(device=target.device, dtype=target.dtype)
    target.copy_(torch.where(keep, values, torch.zeros_like(values)))
    if existing is None:
        parametrize.register_parametrization(module, "weight", SparseMask(keep))


def bake(model: nn.Module) -> int:
    """Remove the sparsity parametrizations, leaving plain `weight` Parameters that contain the zeros.

    Returns how many modules were baked. (A weight that carries other parametrizations besides the mask is
    baked as a whole, because torch can only remove all parametrizations of a tensor at once.)"""
    n = 0
    for module in model.modules():
        if _mask_of(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            n += 1
    return n


def masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{module name: keep mask in the parameter's layout} for every masked weight in `model`."""
    return {name: m.mask for name, mod in model.named_modules() if (m := _mask_of(mod)) is not None}


@torch.no_grad()
def sparsity_stats(model: nn.Module, names: Optional[Iterable[str]] = None) -> Dict[str, object]:
    """Fraction of exact zeros in each named module's weight (default: every masked module) and overall.

    Measures `module.weight` itself, so it reports what the model computes with, masked or baked."""
    modules = dict(model.named_modules())
    names = list(masks(model)) if names is None else list(names)
    per_layer, zeros, total = {}, 0, 0
    for name in names:
        W = modules[name].weight
        z = int((W == 0).sum())
        per_layer[name] = z / W.numel()
        zeros, total = zeros + z, total + W.numel()
    return {"layers": per_layer, "total": zeros / total if total else 0.0, "zeros": zeros, "params": total}

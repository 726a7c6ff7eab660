"""Sparsity masks as `torch.nn.utils.parametrize` parametrizations.

`module.weight` becomes `original * mask`: reading it shows the zeros, the forward uses them, and the
gradient reaching `original` is multiplied by the mask, so fine-tuning cannot revive pruned weights (and even
an optimizer that moves `original` -- weight decay, momentum -- leaves `module.weight` zero there).
`bake(model)` removes the parametrizations, leaving plain `weight` Parameters that hold the zeros.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

__all__ = ["SparseMask", "is_linear_like", "is_sparse_target", "weight_2d", "layer_input_rows", "apply_mask", "bake",
           "remask_from_zeros", "stored_weight", "to_weight_layout", "masks", "sparsity_stats"]


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


def is_dense_conv(module: nn.Module) -> bool:
    """nn.Conv1d / nn.Conv2d / nn.Conv3d without groups: a matrix product over unfolded input patches, so the
    linear-layer algorithms apply to its weight viewed as (out_channels, in_channels * kernel elements)."""
    return (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1
            and isinstance(module.weight, torch.Tensor))


def is_sparse_target(module: nn.Module) -> bool:
    """Layers `pk.Sparse` can prune: linear layers (nn.Linear, Conv1D) and ungrouped Conv1d/Conv2d/Conv3d."""
    return is_linear_like(module) or is_dense_conv(module)


def matmul_coverage(model: nn.Module, targets: Sequence[str]) -> float:
    """Fraction of the model's matmul parameters (Linear/Conv1D/Conv weights of any kind, and 3-D tensors
    outside convolutions such as stacked expert weights) that the named target layers hold."""
    mods = dict(model.named_modules())
    seen: Dict[int, torch.Tensor] = {}       # keeps every counted tensor alive, so ids cannot be reused
    for m in mods.values():
        if is_linear_like(m) or isinstance(m, nn.modules.conv._ConvNd):
            w = stored_weight(m)
            seen.setdefault(id(w), w)
    for p in model.parameters():
        if p.dim() == 3:
            seen.setdefault(id(p), p)
    total = sum(t.numel() for t in seen.values())
    held = sum(mods[n].weight.numel() for n in set(targets))
    return held / total if total else 1.0


def _transposed(module: nn.Module) -> bool:
    # transformers' Conv1D stores (in, out); after masking its class is "ParametrizedConv1D", so test by exclusion
    return not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The effective weight (masked, if parametrized) as (out_features, in_features); a convolution's kernel
    as (out_channels, in_channels * kh * kw), columns in the order F.unfold lays out input patches."""
    W = module.weight
    if _transposed(module):
        return W.t()
    return W.reshape(W.shape[0], -1) if W.dim() > 2 else W


def to_weight_layout(module: nn.Module, t2d: torch.Tensor) -> torch.Tensor:
    """A (out, in) matrix from `weight_2d` coordinates back in the parameter's own layout: transposed for
    Conv1D, reshaped to the kernel shape for convolutions, unchanged for nn.Linear."""
    if _transposed(module):
        return t2d.t()
    shape = stored_weight(module).shape
    return t2d.reshape(shape) if len(shape) > 2 else t2d


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The weight tensor as stored: the parametrization's `original` for a masked module, else `weight`
    (also for a weight the model itself parametrizes with several originals, e.g. weight norm's g and v:
    then the computed weight)."""
    if parametrize.is_parametrized(module, "weight") and hasattr(module.parametrizations["weight"], "original"):
        return module.parametrizations["weight"].original
    return module.weight


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer multiplies its 2-D weight with: (n, in_features) for linear layers (all leading dims
    flattened), the unfolded patches (B * positions, in_channels * kh * kw) for a convolution (its padding,
    stride and dilation applied exactly as in its forward)."""
    if not is_dense_conv(module):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv3d):
        return _conv3d_rows(module, x)
    conv1d = isinstance(module, nn.Conv1d)
    if conv1d:                                              # [B, C, L] -> [B, C, 1, L]
        x = x.unsqueeze(-2)
    k = (1, *module.kernel_size) if conv1d else module.kernel_size
    stride = (1, *module.stride) if conv1d else module.stride
    dil = (1, *module.dilation) if conv1d else module.dilation
    pad = module.padding
    if isinstance(pad, str):                                # 'same' / 'valid': pad explicitly like Conv does
        if pad == "valid":
            pad = (0,) * len(module.kernel_size)
        else:
            total = [d * (kk - 1) for d, kk in zip(module.dilation, module.kernel_size)]
            pads = []
            for t in reversed(total):
                pads += [t // 2, t - t // 2]
            x = F.pad(x, pads if not conv1d else pads + [0, 0], mode="constant" if module.padding_mode == "zeros"
                      else module.padding_mode)
            pad = (0,) * len(module.kernel_size)
    elif module.padding_mode != "zeros":
        x = F.pad(x, list(module._reversed_padding_repeated_twice) + ([0, 0] if conv1d else []), mode=module.padding_mode)
        pad = (0,) * len(module.kernel_size)
    pad = (0, *pad) if conv1d else pad
    cols = F.unfold(x, k, dilation=dil, padding=pad, stride=stride)      # [B, C*kh*kw, positions]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _conv3d_rows(module: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded (B * positions, C * kd * kh * kw) patches of a 3-D convolution (F.unfold is 2-D only): pad
    like the conv, take windows of the dilated kernel's extent along each spatial dim, keep every
    dilation-th element; columns in the order of weight.reshape(out, -1)."""
    if isinstance(module.padding, str):
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        pads = [0] * 6 if module.padding == "valid" else [v for t in reversed(total) for v in (t // 2, t - t // 2)]
    else:
        pads = list(module._reversed_padding_repeated_twice)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, pads, mode=mode) if any(pads) else x
    for dim, (k, st, dl) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + dim, dl * (k - 1) + 1, st)[..., ::dl]           # window dims appended at the end
    b, c, d, h, w = x.shape[:5]                                           # (B, C, D', H', W', kd, kh, kw)
    return x.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b * d * h * w, -1)


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
    keep = to_weight_layout(module, keep)
    new_weight = None if new_weight is None else to_weight_layout(module, new_weight)
    existing = _mask_of(module)
    if existing is not None:
        keep = keep.to(existing.mask.device) & existing.mask
        existing.mask.copy_(keep)
    target = stored_weight(module) if existing is not None else module.weight
    keep = keep.to(target.device)
    values = target if new_weight is None else new_weight.to(device=target.device, dtype=target.dtype)
    target.copy_(torch.where(keep, values, torch.zeros_like(values)))
    if existing is None:
        parametrize.register_parametrization(module, "weight", SparseMask(keep))


@torch.no_grad()
def remask_from_zeros(model: nn.Module, names: Iterable[str]) -> int:
    """Re-install masks on the named layers of a model whose masks were baked (saved, then loaded): every
    weight that is exactly zero becomes masked, so further training keeps it zero. Returns how many layers."""
    modules = dict(model.named_modules())
    n = 0
    for name in names:
        mod = modules.get(name)
        if mod is None or _mask_of(mod) is not None:
            continue
        apply_mask(mod, weight_2d(mod) != 0)
        n += 1
    return n


def bake(model: nn.Module) -> int:
    """Remove the sparsity parametrizations, leaving plain `weight` Parameters that contain the zeros.

    Returns how many modules were baked. (A weight that carries other parametrizations besides the mask is
    baked as a whole, because torch can only remove all parametrizations of a tensor at once.)"""
    n = 0
    for module in model.modules():
        if _mask_of(module) is not None:
            # torch removes the `weight` property from the module's class, and a deepcopy of a parametrized
            # module shares that class with the original: give this module its own class first, so baking
            # a copy can never strip the property from the model it was copied from.
            cls = module.__class__
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
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

"""Importance criteria for structured groups: small pure functions from tensors to per-unit scores.

Every criterion returns one score per unit of a group (higher = more important). Per-member scores are
first reduced to one value per channel (`channel_scores`), then summed into units (`to_units`) and, by
default, normalized per member so a large weight matrix does not drown a norm's scale vector.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from prunekit.errors import ConfigError


def channel_norms(w: torch.Tensor, dim: int, p: int = 2) -> torch.Tensor:
    """(size of `dim`,) p-norm**p of every slice of `w` along `dim`: sum |w|^p over the other dims."""
    w = w.detach().float()
    other = [d for d in range(w.dim()) if d != dim]
    a = w.abs() if p == 1 else w.pow(2)
    return a.sum(other) if other else a


def to_units(values: torch.Tensor, pos: torch.Tensor, unit: torch.Tensor, n_units: int,
             reduce: str = "sum") -> torch.Tensor:
    """Aggregate per-position values into per-unit scores (sum/mean/max over the unit's positions)."""
    v = values[pos]
    out = torch.zeros(n_units, dtype=torch.float64)
    if reduce == "max":
        return out.scatter_reduce(0, unit, v.double(), reduce="amax", include_self=False)
    out.index_add_(0, unit, v.double())
    if reduce == "mean":
        cnt = torch.zeros(n_units, dtype=torch.float64).index_add_(0, unit, torch.ones_like(v, dtype=torch.float64))
        out = out / cnt.clamp_min(1)
    return out


def normalize(s: torch.Tensor, how: Optional[str] = "mean") -> torch.Tensor:
    """Per-member normalization: 'mean' (divide by mean), 'max', 'sum', or None."""
    if how is None:
        return s
    d = {"mean": s.mean(), "max": s.max(), "sum": s.sum()}[how]
    return s / d if float(d) > 0 else s


def taylor(w: torch.Tensor, grad: torch.Tensor, dim: int) -> torch.Tensor:
    """First-order Taylor importance per channel: |sum over the slice of w * dL/dw| (Molchanov et al. 2019)."""
    other = [d for d in range(w.dim()) if d != dim]
    prod = (w.detach().float() * grad.float())
    return (prod.sum(other) if other else prod).abs()


def bn_scale(gamma: torch.Tensor) -> torch.Tensor:
    """Network slimming: |gamma| of the BatchNorm that follows the channel."""
    return gamma.detach().abs().float()


def magnitude_group_scores(group, tensors: Dict[str, torch.Tensor], p: int = 2,
                           norm: Optional[str] = "mean", reduce: str = "sum") -> torch.Tensor:
    """Magnitude importance of each unit of `group`: sum over members of normalized slice norms."""
    total = torch.zeros(group.n_units, dtype=torch.float64)
    used = 0
    for m in group.members:
        if m.is_buffer:
            continue
        t = tensors[m.name]
        s = to_units(channel_norms(t, m.dim, p), m.pos, m.unit, group.n_units, reduce)
        total += normalize(s, norm)
        used += 1
    if used == 0:
        raise ConfigError(f"group {group.index} has no parameters to score")
    return total


def random_scores(group, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    return torch.rand(group.n_units, generator=generator, dtype=torch.float64)

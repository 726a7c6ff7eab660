"""Importance criteria for structured groups: small pure functions from tensors to per-unit scores.

Every criterion returns one score per unit of a group (higher = more important). Per-member scores are
first reduced to one value per channel (`channel_scores`), then summed into units (`to_units`) and, by
default, normalized per member so a large weight matrix does not drown a norm's scale vector.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

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


# ---------------------------------------------------------------- combining members of a group

AGGS = ("sum", "mean", "max")
ChannelValues = Dict[Tuple[str, int], torch.Tensor]     # (tensor name, dim) -> one value per channel


def aggregate(per_member: Sequence[torch.Tensor], agg: str = "sum") -> torch.Tensor:
    """Combine per-member unit scores (each (n_units,)) into one score per unit: sum, mean or max."""
    if not per_member:
        raise ConfigError("aggregate(): no member scores to combine")
    stacked = torch.stack([s.double() for s in per_member])
    if agg == "sum":
        return stacked.sum(0)
    if agg == "mean":
        return stacked.mean(0)
    if agg == "max":
        return stacked.max(0).values
    raise ConfigError(f"aggregate(): agg must be one of {AGGS}, got {agg!r}")


def combine(group, channel_values: ChannelValues, agg: str = "sum", norm: Optional[str] = "mean",
            reduce: str = "sum") -> torch.Tensor:
    """Per-unit scores of `group` from per-channel values of its members.

    Each member (tensor name, dim) found in `channel_values` is reduced to units (`reduce` over the unit's
    positions, e.g. the head_dim channels of one attention head), normalized per member (`norm`), then all
    members are combined with `agg`. Members without values (buffers, tensors the criterion does not see)
    are skipped; a group with none raises ValueError naming it."""
    per = []
    for m in group.members:
        v = channel_values.get((m.name, m.dim))
        if v is None:
            continue
        per.append(normalize(to_units(v.reshape(-1), m.pos, m.unit, group.n_units, reduce), norm))
    if not per:
        raise ConfigError(f"no scored tensor in {group.describe()}; this criterion cannot rank it")
    return aggregate(per, agg)


def magnitude_channel_values(group, tensors: Dict[str, torch.Tensor], p: int = 2) -> ChannelValues:
    """(name, dim) -> sum |w|^p of every slice along dim, for the parameter members of `group`."""
    return {(m.name, m.dim): channel_norms(tensors[m.name], m.dim, p)
            for m in group.members if not m.is_buffer and m.name in tensors}


def bn_scale_scores(group, tensors: Dict[str, torch.Tensor], bn_weights: Iterable[str], agg: str = "sum",
                    norm: Optional[str] = None) -> Optional[torch.Tensor]:
    """Network slimming (Liu et al. 2017): |gamma| of the BatchNorms on the group's channels.

    `bn_weights` are the names of BatchNorm weight tensors in the model. Returns None if the group has no
    BatchNorm (the caller decides on a fallback)."""
    bn = set(bn_weights)
    vals = {(m.name, m.dim): bn_scale(tensors[m.name]) for m in group.members if m.name in bn and m.dim == 0}
    if not vals:
        return None
    return combine(group, vals, agg=agg, norm=norm)


def apoz_to_importance(apoz: torch.Tensor) -> torch.Tensor:
    """APoZ (Hu et al. 2016) is the fraction of zero (<= 0 before ReLU) activations of a channel: a channel
    that is almost always zero carries little. Importance = 1 - APoZ, so higher still means keep."""
    return 1.0 - apoz.double()


def fluctuation_values(var: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """FLAP (An et al. 2024): a consumer's input channel j matters by how much it *varies*, weighted by the
    squared norm of the weight column that reads it: Var(X_j) * ||W[:, j]||^2. A channel that is nearly
    constant can be replaced by its mean, which bias compensation folds into the consumer's bias."""
    return var.float() * weight.detach().float().pow(2).sum(0)



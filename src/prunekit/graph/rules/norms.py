"""Normalization layers: their per-channel parameters follow the normalized channels; the ids a statistic is
taken over are recorded (stat_ids) so importance can account for renormalization."""
from __future__ import annotations

import torch

from prunekit.graph.ops import arg


def rule_batch_norm(tr, args, kwargs, out):
    x = args[0]
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        p = arg(args, kwargs, i, name)
        if isinstance(p, torch.Tensor):
            tr.couple(p, [0], x, [1])
    tr.set(out, list(tr.blocks(x)))


def rule_layer_norm(tr, args, kwargs, out):
    x = args[0]
    ns = arg(args, kwargs, 1, "normalized_shape")
    n = len(ns) if isinstance(ns, (list, tuple, torch.Size)) else 1
    dims = list(range(x.dim() - n, x.dim()))
    w = arg(args, kwargs, 2, "weight")
    b = arg(args, kwargs, 3, "bias")
    affine = False
    for p in (w, b):
        if isinstance(p, torch.Tensor):
            tr.couple(p, list(range(p.dim())), x, dims)
            affine = True
    for d in dims:
        if d in tr.tracked_dims(x):
            if not affine:      # normalized_shape is a literal: that dim must keep its size
                for blk in tr.blocks(x):
                    if blk.shape[d] > 1:
                        tr.space.pin(blk)
            tr.stat(tr.ids_along(x, d))
    tr.set(out, list(tr.blocks(x)))


def rule_rms_norm(tr, args, kwargs, out):
    rule_layer_norm(tr, (args[0], args[1], arg(args, kwargs, 2, "weight"), None), {}, out)


def rule_group_norm(tr, args, kwargs, out):
    x = args[0]
    G = arg(args, kwargs, 1, "num_groups")
    w = arg(args, kwargs, 2, "weight")
    b = arg(args, kwargs, 3, "bias")
    xr = tr.rep_vec(x, 1)
    if xr is not None:
        xg = xr.view(G, -1)
        tr.space.union(xg[:1].expand_as(xg), xg)    # same local positions in every group
        tr.stat(xr)
    for p in (w, b):
        if isinstance(p, torch.Tensor):
            tr.couple(p, [0], x, [1])
    tr.set(out, list(tr.blocks(x)))


def rule_normalize(tr, args, kwargs, out):
    x = args[0]
    dim = arg(args, kwargs, 2, "dim", 1)
    tr.stat(tr.ids_along(x, dim))
    tr.set(out, list(tr.blocks(x)))


def rule_weight_norm(tr, args, kwargs, out):
    """`torch._weight_norm(v, g, dim)` (weight normalization, e.g. wav2vec2's positional conv through
    `parametrizations.weight_norm`): w = v * g / ||v||, the norm taken over every dim except `dim`.

    Every dim of v and g is pinned. Removing a slice of a dim the norm spans changes the norm and with it
    every kept weight, so the cut model could not equal the dense one. A cut along `dim` itself would be
    exact, but the check that proves a cut (the dense model with the removed slices zeroed) would compute
    0 * g / ||0|| = NaN there, so those channels stay too (they are coupled with g first, so what they feed
    or read stays consistent)."""
    v, g = args[0], args[1]
    dim = arg(args, kwargs, 2, "dim", 0)
    if dim is not None and dim != -1 and isinstance(g, torch.Tensor) and g.dim() == v.dim():
        tr.couple(g, [dim % v.dim()], v, [dim % v.dim()])
    tr.pin_tensor(v)
    if isinstance(g, torch.Tensor):
        tr.pin_tensor(g)
    tr.set(out, list(tr.blocks(v)))

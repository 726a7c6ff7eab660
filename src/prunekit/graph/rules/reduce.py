"""Reductions (sum, mean, max, norm, ...) and spatial ops (pooling, interpolation) that keep batch and
channel dims."""
from __future__ import annotations

import torch

from prunekit.graph.labels import reduce_to, tracked
from prunekit.graph.ops import STAT_REDUCE, tensors


NORMS = {"norm", "vector_norm", "linalg_vector_norm", "linalg_norm"}


def reduce(tr, name, args, kwargs, out):
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    outs = tensors(out)
    if src is None or not outs:
        return
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
    if name in NORMS:                      # norm(input, p/ord, dim, keepdim): the second argument is not a dim
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
    if dim is None:
        dims = list(range(src.dim()))
    elif isinstance(dim, int):
        dims = [dim % src.dim()]
    else:
        dims = [d % src.dim() for d in dim]
    td = tr.tracked_dims(src)
    if name in STAT_REDUCE:
        for d in dims:
            if d in td:
                tr.stat(tr.ids_along(src, d))
    keep = [d for d in range(src.dim()) if d not in dims]
    blocks = []
    for b in tr.blocks(src):
        if not (set(tracked(b, src.shape)) & set(keep)):
            continue
        r = reduce_to(tr.space, b, [d for d in keep if b.shape[d] > 1])
        if not keepdim:
            r = r.reshape([r.shape[d] for d in keep]) if keep else r.reshape(())
        blocks.append(r)
    for o in outs:
        if o.dim() == (src.dim() if keepdim else len(keep)) and o.is_floating_point() == src.is_floating_point():
            tr.set(o, blocks)
        else:
            tr.set(o, [])


def spatial(tr, args, out):
    src = args[0]
    outs = tensors(out)
    keepd = [0, 1] if src.dim() >= 3 else [0]
    blocks = []
    for b in tr.blocks(src):
        if set(tracked(b, src.shape)) - set(keepd):
            b = reduce_to(tr.space, b, [d for d in keepd if b.shape[d] > 1])
        blocks.append(b)
    for o in outs:
        tr.set(o, blocks if o.dim() == src.dim() else [])

"""Lookups and writes by index: embedding tables (vocabulary rows stay) and item assignment."""
from __future__ import annotations

import torch

from prunekit.graph.ops import arg


def rule_embedding(tr, args, kwargs, out):
    idx, w = args[0], arg(args, kwargs, 1, "weight")
    rows = tr.rep_vec(w, 0)
    if rows is not None:
        tr.space.pin(rows)   # vocabulary entries are not pruned
    cols = tr.rep_vec(w, 1)
    blocks = []
    if cols is not None:
        shape = [1] * out.dim()
        shape[-1] = out.shape[-1]
        blocks.append(cols.view(shape))
    tr.set(out, blocks)


def rule_setitem(tr, args, kwargs, out):
    target, value = args[0], args[2] if len(args) > 2 else None
    if tr.blocks(target) or (isinstance(value, torch.Tensor) and tr.blocks(value)):
        tr.pin_tensor(target)
        if isinstance(value, torch.Tensor):
            tr.pin_tensor(value)

"""Broadcasting ops (add, mul, where, ...), unary ops and per-channel scales: operands that meet on a dim hold
the same channels there."""
from __future__ import annotations

from typing import List

import torch

from prunekit.graph.labels import align, collapse
from prunekit.graph.ops import tensors


def _all_uniform(tr, args, kwargs, out) -> bool:
    """Every tensor operand holds one value everywhere (zeros * 0.9, ones.to(dtype)): so does the result."""
    ins = tensors((args, kwargs))
    if not ins or any(id(t) not in tr.uniform for t in ins):
        return False
    for o in tensors(out):
        tr.set(o, [])
        tr.uniform.add(id(o))
    return True


def elementwise(tr, args, kwargs, out):
    outs = tensors(out)
    if not outs or _all_uniform(tr, args, kwargs, out):
        return
    o = outs[0]
    # a tensor holding one value everywhere (torch.zeros(...) as a scan's initial state) acts like a scalar
    every = [t for t in tensors((args, kwargs)) if t.dim() <= o.dim()]
    ins = [t for t in every if not (tr.uniform_scalars and id(t) in tr.uniform)]
    nd = o.dim()
    entries = []  # (input index, aligned block)
    for i, t in enumerate(ins):
        for b in tr.blocks(t):
            entries.append((i, align(b, nd)))
    if not entries:
        tr.set(o, [])
        return
    tr.used_uniform |= len(ins) < len(every)
    shapes = [[1] * (nd - t.dim()) + list(t.shape) for t in ins]
    # outside data (untracked, full size) along a tracked dim: that dim must not shrink
    for d in range(nd):
        if o.shape[d] <= 1:
            continue
        untracked_full = any(shapes[i][d] == o.shape[d] and
                             not any(b.shape[d] == o.shape[d] for j, b in entries if j == i)
                             for i in range(len(ins)))
        if untracked_full:
            entries = [(i, collapse(tr.space, b, d) if b.shape[d] > 1 else b) for i, b in entries]
    # a block broadcast across dims that another block tracks (RoPE's cos over (heads, head_dim), a per-d
    # bias shared by all heads) is one-to-many: its entry may only go when its whole slab goes. Keep it
    # whole and let the other block shrink only along its remaining dims.
    dims_of = lambda b: frozenset(d for d in range(nd) if b.shape[d] > 1)
    changed = True
    while changed:
        changed = False
        for x in range(len(entries)):
            for y in range(len(entries)):
                if x == y or entries[x][0] == entries[y][0]:
                    continue
                dx, dy = dims_of(entries[x][1]), dims_of(entries[y][1])
                if dy and dy < dx:
                    tr.space.pin(entries[y][1])
                    bx = entries[x][1]
                    for d in sorted(dy):
                        bx = collapse(tr.space, bx, d) if bx.shape[d] > 1 else bx
                    entries[x] = (entries[x][0], bx)
                    entries.pop(y)
                    changed = True
                    break
            if changed:
                break
    # union blocks that share a tracked dim
    for x in range(len(entries)):
        for y in range(x + 1, len(entries)):
            bx, by = entries[x][1], entries[y][1]
            shared = [d for d in range(nd) if bx.shape[d] > 1 and by.shape[d] > 1]
            if shared and entries[x][0] != entries[y][0]:
                tr.space.union(bx, by)
    # output: one block per cluster of overlapping blocks (the one spanning most dims)
    result: List[torch.Tensor] = []
    for _, b in sorted(entries, key=lambda e: -sum(s > 1 for s in e[1].shape)):
        bt = {d for d in range(nd) if b.shape[d] > 1}
        if any(bt & {d for d in range(nd) if r.shape[d] > 1} for r in result):
            continue
        result.append(b)
    for oo in outs:
        if oo.shape == o.shape:
            tr.set(oo, result)


def unary(tr, name, args, kwargs, out):
    """One input, same-shape output (activations, casts, dropout, softmax): labels pass through unchanged."""
    ins = tensors((args, kwargs))
    if _all_uniform(tr, args, kwargs, out):
        return
    if ins and isinstance(out, torch.Tensor):
        src = args[0] if args and isinstance(args[0], torch.Tensor) else ins[0]
        if src.shape == out.shape:
            tr.set(out, list(tr.blocks(src)))
            if name in ("softmax", "log_softmax", "_softmax"):
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                if isinstance(dim, int):
                    tr.stat(tr.ids_along(src, dim))
            return
    return elementwise(tr, args, kwargs, out)


def rule_prelu(tr, args, kwargs, out):
    x, w = args[0], args[1]
    if w.numel() > 1:
        tr.couple(w, [0], x, [1])
    tr.set(out, list(tr.blocks(x)))

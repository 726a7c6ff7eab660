"""Data movement (view, permute, index, pad, split, cat, ...): labels are probed by running the op itself on
a tensor of ids, so these ops need no per-op index rules; split/chunk and cat add their couplings."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch.utils._pytree import tree_flatten

from prunekit.errors import GraphError
from prunekit.graph.labels import align, collapse, compress, reduce_to, tracked
from prunekit.graph.ops import tensors
from prunekit.graph.rules.indexing import fix_dims


def movement(tr, name, func, args, kwargs, out):
    outs = tensors(out)
    if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
        return cat(tr, name, args, kwargs, out)
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if src is None:
        for o in outs:
            tr.set(o, [])
        return
    if name in ("view", "reshape", "unflatten", "expand", "repeat", "flatten", "view_as", "reshape_as"):
        record_reshape(tr, name, args, kwargs, out)
    if name in ("chunk", "split", "tensor_split", "split_with_sizes"):
        equal_parts(tr, name, src, args, kwargs, outs)
    if name in ("index_select", "gather", "take_along_dim"):      # positions chosen by the index's values
        at = 2 if name == "take_along_dim" else 1                   # take_along_dim(x, index, dim=None)
        dim = kwargs.get("dim", args[at] if len(args) > at else None)
        fix_dims(tr, src, [dim] if isinstance(dim, int) else range(src.dim()))
    if any(o.numel() == 0 for o in outs) and src.numel():
        tr.pin_tensor(src)     # an empty result shows no positions (no score above the threshold, random
        #                        weights): what later code does with them is unknown, so nothing may shrink
    new_blocks: Dict[int, List[torch.Tensor]] = {id(o): [] for o in outs}
    for b in tr.blocks(src):
        probe = b.to(torch.float64).expand(src.shape).contiguous()
        pargs = (probe,) + tuple(args[1:])
        pkw = dict(kwargs)
        if name == "pad":
            pkw["value"] = -1.0
            if len(pargs) > 3:
                pargs = pargs[:3]
            mode = pkw.get("mode", args[2] if len(args) > 2 else "constant")
            if mode != "constant":
                pkw.pop("value")
        if "out" in pkw:
            pkw.pop("out")
        with torch.no_grad():
            pout = func(*pargs, **pkw)
        pouts = tensors(pout)
        for o, po in zip(outs, pouts):
            if po.shape != o.shape:
                raise GraphError(tr.where(name) + f": label probe has shape {tuple(po.shape)} but the op "
                                 f"returned {tuple(o.shape)}. " + tr.hint())
            c = compress(po)
            if c is not None and not tracked(c, o.shape):
                tr.space.pin(c)      # single positions picked out (x[:, 0::4] of 4 box columns, scores[:, label]):
            elif c is not None:      # the code names them by position, which pruning would shift
                new_blocks[id(o)].append(c)
    for o in outs:
        tr.set(o, new_blocks[id(o)])


def equal_parts(tr, name, src, args, kwargs, outs):
    """chunk/split cut a channel dim by count: every part must lose the same local positions.

    A split by an explicit list of sizes can only follow pruning if the list is a module attribute
    (recorded for update); a list written literally in forward() pins the dim. A split by one size
    (`torch.split(x, self.width, 1)`, `x.split(self.expand_chs // 2, dim=1)`) keeps equal parts, and the
    module attribute holding that size, or the total it was computed from, is recorded for update."""
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    dim = dim % src.dim()
    if dim not in tr.tracked_dims(src):
        return
    sizes = [o.shape[dim] for o in outs]
    spec = args[1] if len(args) > 1 else next((kwargs[k] for k in ("split_size_or_sections", "split_size",
                                                                    "chunks", "sections") if k in kwargs), None)
    if isinstance(spec, (list, tuple)) and name != "chunk":
        attr = _owner_attr(tr, lambda v: isinstance(v, (list, tuple)) and list(v) == list(spec), unique=False)
        if attr is None:
            _pin_dim(tr, src, dim)
            return
        tr.split_attrs.append((tr.module_stack[-1], attr, _parts(tr, src, dim, sizes), "list"))
        return
    if len(set(sizes)) != 1:
        _pin_dim(tr, src, dim)
        return
    # position i of every part goes with position i of the first, elementwise: the other tracked dims (the
    # heads of a fused qkv viewed as (heads, 3 * head_dim), GPT-NeoX) stay apart
    for b in tr.blocks(src):
        b = align(b, src.dim())
        if b.shape[dim] == src.shape[dim]:
            parts = b.split(sizes[0], dim)
            for p in parts[1:]:
                tr.space.union(parts[0], p)
    if name in ("split", "split_with_sizes") and isinstance(spec, int) and len(sizes) > 1:
        for kind, value in (("size", spec), ("total", src.shape[dim])):
            attr = _owner_attr(tr, lambda v: isinstance(v, int) and not isinstance(v, bool) and v == value)
            if attr is not None:
                tr.split_attrs.append((tr.module_stack[-1], attr, _parts(tr, src, dim, sizes), kind))
                break


def _owner_attr(tr, match, unique=True):
    """The public attribute of the module running the op whose value satisfies `match`; None if there is none,
    or with `unique` several (GPT-2 keeps embed_dim == split_size: which one the code used is unknown)."""
    owner = tr.module_by_name.get(tr.module_stack[-1])
    if owner is None:
        return None
    found = [k for k, v in vars(owner).items() if not k.startswith("_") and match(v)]
    return found[0] if len(found) == 1 or (found and not unique) else None


def _parts(tr, src, dim, sizes):
    ids = tr.dim_ids(src, dim)
    parts, off = [], 0
    for n in sizes:
        parts.append(ids[off:off + n])
        off += n
    return parts


def _pin_dim(tr, src, dim):
    for b in tr.blocks(src):
        if b.shape[dim] > 1:
            tr.space.pin(b)


def record_reshape(tr, name, args, kwargs, out):
    if not isinstance(out, torch.Tensor):
        return
    sizes = [a for a in tree_flatten((args[1:], kwargs))[0] if isinstance(a, int) and not isinstance(a, bool)]
    if not sizes:
        return
    # ids per output dim, filled in by `finish_reshapes` once the output's labels exist
    tr.pending_reshape = (tr.module_stack[-1], name, sizes, out)


def cat(tr, name, args, kwargs, out):
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and not (t.dim() == 1 and t.numel() == 0)]
    o = out
    if name in ("stack", "hstack", "vstack") or not isinstance(o, torch.Tensor):
        if name == "stack":
            tensors = [t.unsqueeze(dim) for t in tensors]  # plain tensors, labels handled below
        if name != "stack":
            tr.set(o, [])
            for t in tensors:
                tr.pin_tensor(t)
            return
    nd = o.dim()
    dim = dim % nd
    ins = tensors
    if name == "stack":
        ins = args[0] if args else kwargs.get("tensors")
        ins = [t for t in ins if isinstance(t, torch.Tensor)]
    if len(ins) == 1 and name != "stack":
        tr.set(o, list(tr.blocks(ins[0])))
        return
    # 1) the concat dim: ids laid end to end (probes keep any grid structure, e.g. rotate_half on heads)
    along = []
    any_along = False
    for t in ins:
        tt = t if name != "stack" else t.unsqueeze(dim)
        bl = [b for b in tr.blocks(t) if name != "stack" and dim in tracked(b, t.shape)]
        # a block constant along the concat dim (RoPE's rotated part, collapsed over head_dim) still holds its
        # channels at every position there
        bl = bl or [align(b, t.dim()) for b in tr.blocks(t) if name != "stack"][:1]
        if bl:
            any_along = True
            along.append(bl[0].to(torch.float64).expand(tt.shape))
        else:
            along.append(torch.full(tt.shape, -1.0, dtype=torch.float64))
    blocks = []
    if any_along:
        c = compress(torch.cat(along, dim))
        if c is not None:
            blocks.append(c)
    # 2) other dims: all inputs hold the same channels there
    others = []
    for i, t in enumerate(ins):
        for b in tr.blocks(t):
            b = align(b, t.dim())
            if name == "stack":
                b = b.unsqueeze(dim)
            if b.shape[dim] > 1:
                keep = [d for d in range(nd) if d != dim and b.shape[d] > 1]
                if not keep:
                    continue
                b = reduce_to(tr.space, b, keep)
            others.append((i, b))
    for x in range(len(others)):
        for y in range(x + 1, len(others)):
            bx, by = others[x][1], others[y][1]
            if any(bx.shape[d] > 1 and by.shape[d] > 1 for d in range(nd)) and others[x][0] != others[y][0]:
                tr.space.union(bx, by)
    covered = set()
    for i, b in sorted(others, key=lambda e: -sum(s > 1 for s in e[1].shape)):
        bt = frozenset(d for d in range(nd) if b.shape[d] > 1)
        if bt & covered:
            continue
        covered |= bt
        blocks.append(b)
    # inputs untracked on a dim that others track: that dim must not shrink
    for d in covered:
        for t in ins:
            tt = t if name != "stack" else t.unsqueeze(dim)
            if tt.shape[d] > 1 and d not in tr.tracked_dims(tt if name != "stack" else t):
                for j, b in enumerate(blocks):
                    if b.shape[d] > 1:
                        blocks[j] = collapse(tr.space, b, d)
    tr.set(o, blocks)

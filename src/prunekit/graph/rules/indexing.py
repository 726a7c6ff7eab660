"""Lookups and writes by index: embedding tables (vocabulary rows stay), item assignment and the in-place
writes (`copy_`, `index_add_`/`index_copy_`, `scatter_`/`scatter_add_`).

A write lines up target and source position by position along some dims (those couple: the written channels
are the target's channels) and puts data at positions chosen by an index along others; a channel dim of the
second kind cannot shrink, so it is pinned (or, inside a multi-dim block, made one unit along that dim)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from prunekit.graph.labels import align, collapse, reduce_to, tracked
from prunekit.graph.ops import arg, tensors


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


def fix_dims(tr, t: torch.Tensor, dims: Sequence[int]) -> List[torch.Tensor]:
    """Blocks of `t` made safe for dims whose positions the data decides: a block tracking only such dims is
    pinned (dropped from the result); one that also tracks other dims becomes one unit along them."""
    dims = {d % t.dim() for d in dims} if t.dim() else set()
    kept = []
    for b in tr.blocks(t):
        td = set(tracked(b, t.shape))
        if not td & dims:
            kept.append(b)
        elif td <= dims:
            tr.space.pin(b)
        else:
            for d in sorted(td & dims):
                b = collapse(tr.space, b, d)
            kept.append(b)
    return kept


def write(tr, target: torch.Tensor, source, lined: Sequence[Tuple[int, int]], fixed: Sequence[int]):
    """`target` receives `source`: target dim td and source dim sd hold the same positions for every
    (td, sd) in `lined`; target dims in `fixed` are written at data-dependent positions."""
    src = source if isinstance(source, torch.Tensor) else None
    lined = [(td % target.dim(), sd % src.dim()) for td, sd in lined] if src is not None else []
    t_blocks = fix_dims(tr, target, fixed)
    if src is not None:
        s_lined = {sd for _, sd in lined}
        fix_dims(tr, src, [d for d in range(src.dim()) if d not in s_lined and src.shape[d] > 1])
    tr.set(target, t_blocks)
    if src is None or not lined:
        return
    if tr.tracked_dims(target) & {td for td, _ in lined}:
        tr.couple(target, [td for td, _ in lined], src, [sd for _, sd in lined])
        return
    # a fresh target (zeros, empty) takes the source's channels
    order = sorted(lined, key=lambda p: p[1])
    new = list(t_blocks)
    for b in tr.blocks(src):
        pairs = [(td, sd) for td, sd in order if sd in tracked(b, src.shape)]
        if pairs:
            new.append(_place(reduce_to(tr.space, align(b, src.dim()), [sd for _, sd in pairs]), pairs,
                              target.dim()))
    tr.set(target, new)


def _place(r: torch.Tensor, pairs: Sequence[Tuple[int, int]], nd: int) -> torch.Tensor:
    """A source block reduced to the source dims of `pairs` (ascending), laid out on their target dims."""
    sds = [sd for _, sd in pairs]
    g = r.permute(sds + [d for d in range(r.dim()) if d not in sds]).reshape([r.shape[sd] for sd in sds])
    by_target = sorted(range(len(pairs)), key=lambda i: pairs[i][0])
    g = g.permute(by_target)
    shape = [1] * nd
    for i in by_target:
        shape[pairs[i][0]] = r.shape[pairs[i][1]]
    return g.reshape(shape)


def _trailing(target, source, first: int) -> List[Tuple[int, int]]:
    """Target dims from `first` on, paired with the right-aligned source dims of the same size."""
    if not isinstance(source, torch.Tensor):
        return []
    pairs = []
    for td in range(first, target.dim()):
        sd = source.dim() - (target.dim() - td)
        if sd >= 0 and source.shape[sd] == target.shape[td] and target.shape[td] > 1:
            pairs.append((td, sd))
    return pairs


def rule_setitem(tr, args, kwargs, out):
    """`target[key] = value`. A key of indices/slices over leading dims leaves the trailing dims lined up
    (MultiScaleRoIAlign's `result[idx_in_level] = roi_align(...)`); other keys pin both sides."""
    target, key, value = args[0], args[1], args[2] if len(args) > 2 else None
    key = key if isinstance(key, tuple) else (key,)
    if not tr.blocks(target) and not (isinstance(value, torch.Tensor) and tr.blocks(value)):
        return
    if any(k is None or k is Ellipsis for k in key):
        tr.pin_tensor(target)
        if isinstance(value, torch.Tensor):
            tr.pin_tensor(value)
        return
    n = sum(k.dim() if isinstance(k, torch.Tensor) and k.dtype == torch.bool else 1 for k in key)
    write(tr, target, value, _trailing(target, value, n), range(min(n, target.dim())))


def rule_copy_(tr, args, kwargs, out):
    target, src = args[0], args[1]
    write(tr, target, src, _trailing(target, src, 0), [])


def rule_index_write(tr, args, kwargs, out):
    """index_add_/index_copy_(dim, index, source): positions along `dim` come from `index`."""
    target, dim, source = args[0], args[1], args[3] if len(args) > 3 else kwargs.get("source")
    dim %= target.dim()
    lined = [(d, d) for d in range(target.dim()) if d != dim and isinstance(source, torch.Tensor)
             and source.dim() == target.dim() and source.shape[d] == target.shape[d]]
    write(tr, target, source, lined, [dim])


def rule_scatter_(tr, args, kwargs, out):
    """scatter_/scatter_add_(dim, index, src | value): position i along other dims is written only for
    i < index.shape[d], so those dims line up only where the index spans them fully. An index built with
    the data's shape (`idx.expand_as(x)`) follows pruning; one built from literal sizes fails the cut check."""
    target, dim, index = args[0], args[1] % args[0].dim(), args[2]
    src = args[3] if len(args) > 3 else kwargs.get("src")
    full = [d for d in range(target.dim()) if d != dim and index.shape[d] == target.shape[d]]
    lined = [(d, d) for d in full if isinstance(src, torch.Tensor) and src.shape[d] == target.shape[d]]
    write(tr, target, src, lined, [d for d in range(target.dim()) if d not in full])


def out_of_place(rule):
    """The rule of `torch.scatter(x, ...)`, `x.index_add(...)` etc.: the result is a copy of `x` (same channels)
    that then receives the write exactly as the in-place op would."""
    def apply(tr, args, kwargs, out):
        res = tensors(out)
        if not res or not isinstance(args[0], torch.Tensor):
            return
        tr.set(res[0], list(tr.blocks(args[0])))
        rule(tr, (res[0],) + tuple(args[1:]), kwargs, res[0])
    apply.__doc__ = f"Out-of-place form of {rule.__name__}: {rule.__doc__ or ''}"
    return apply

"""Ops whose output *values* are positions: `nonzero`/`argwhere`, single-argument `where(cond)`, `argmax`/
`argmin`, the indices of `max(dim)`/`min(dim)`, and boolean-mask indexing (`x[mask]`, `masked_select`),
which flattens the dims the mask covers into one data-dependent dim.

Removing a channel along such a dim shifts every later position by one, so code that turns positions into
meanings (`labels = idx % num_classes`, `anchor = idx // num_classes` in torchvision's FCOS/RetinaNet
post-processing) silently computes something else. These rules pin the dims whose positions the values
encode, whatever happens to the result later, and even when the result is empty (random weights leave no
score above the threshold): pinning is always correct, it only prunes less. `topk`/`sort`/`argsort` pin
their reordered dim the same way (selection.py)."""
from __future__ import annotations

from typing import List

import torch

from prunekit.graph.ops import arg, tensors
from prunekit.graph.rules.elementwise import elementwise
from prunekit.graph.rules.indexing import fix_dims
from prunekit.graph.rules.movement import movement
from prunekit.graph.rules.reduce import reduce


def _no_labels(tr, out):
    for o in tensors(out):
        tr.set(o, [])


def rule_nonzero(tr, args, kwargs, out):
    """nonzero/argwhere(x): the coordinates of x's nonzero entries, along every dim."""
    tr.pin_tensor(args[0])
    _no_labels(tr, out)


def rule_where(tr, args, kwargs, out):
    """where(cond) is nonzero(cond, as_tuple=True); where(cond, a, b) is elementwise."""
    if len(args) == 1 and not kwargs:
        return rule_nonzero(tr, args, kwargs, out)
    return elementwise(tr, args, kwargs, out)


def rule_arg_extreme(tr, args, kwargs, out):
    """argmax/argmin(x, dim=None): the position along `dim` (of the flattened x without one)."""
    x, dim = args[0], arg(args, kwargs, 1, "dim")
    if isinstance(dim, int) and x.dim():
        fix_dims(tr, x, [dim])
    else:
        tr.pin_tensor(x)
    _no_labels(tr, out)


def rule_max_min(tr, args, kwargs, out):
    """max/min: elementwise with a tensor, a reduction otherwise; with `dim` its indices are positions."""
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        return elementwise(tr, args, kwargs, out)
    dim = arg(args, kwargs, 1, "dim")
    if isinstance(dim, int) and args[0].dim():
        fix_dims(tr, args[0], [dim])
    return reduce(tr, "max", args, kwargs, out)


def _is_mask(k) -> bool:
    return isinstance(k, torch.Tensor) and k.dtype == torch.bool


def _is_index(k) -> bool:
    """An integer index tensor or list: its values are positions along the dim it indexes."""
    if isinstance(k, torch.Tensor):
        return k.dtype != torch.bool and not k.is_floating_point() and k.dim() > 0
    return isinstance(k, list) and len(k) > 0 and all(isinstance(i, int) and not isinstance(i, bool) for i in k)


def _key_dims(x: torch.Tensor, key) -> List[int]:
    """Dims of `x` whose positions a key chooses by value: those covered by boolean masks (flattened into
    one data-dependent dim) and those indexed by integer tensors or lists."""
    key = key if isinstance(key, tuple) else (key,)
    width = [0 if k is None else k.dim() if _is_mask(k) else 1 for k in key if k is not Ellipsis]
    dims, pos, seen = [], 0, 0
    for k in key:
        if k is Ellipsis:                    # what follows is aligned to the end
            pos = x.dim() - sum(width[seen:])
            continue
        n = width[seen]
        seen += 1
        if _is_mask(k) or _is_index(k):
            dims += list(range(pos, pos + n))
        pos += n
    return [d for d in dims if d < x.dim()]


def rule_getitem(tr, args, kwargs, out):
    """x[key]: data movement (probed), except that boolean masks and integer index tensors in the key pick
    positions by value: `boxes[keep]`, `mask_prob[index, labels]` (Mask R-CNN), `boxes[inds]` with `inds`
    from other scores (Faster R-CNN's box decoding). Pruning those dims would shift what the values name."""
    x, key = args[0], args[1]
    parts = key if isinstance(key, tuple) else (key,)
    if isinstance(x, torch.Tensor) and any(_is_mask(k) or _is_index(k) for k in parts):
        fix_dims(tr, x, _key_dims(x, key))
        for k in parts:
            if _is_mask(k):
                tr.pin_tensor(k)
    return movement(tr, "__getitem__", torch.Tensor.__getitem__, args, kwargs, out)


def rule_masked_select(tr, args, kwargs, out):
    """masked_select(x, mask): the selected entries of x (broadcast with mask), flattened."""
    for t in tensors((args, kwargs)):
        tr.pin_tensor(t)
    _no_labels(tr, out)

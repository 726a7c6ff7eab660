"""Element-level channel labels: the index algebra behind the dependency graph.

Every parameter (and buffer) element along every dimension gets an integer id: parameter `p` of shape
(O, I, k, k) gets O ids for dim 0 and I ids for dim 1. Id 0 is PIN (never removable).

While the model runs, every tensor carries *blocks*: LongTensors broadcastable to the tensor (same ndim,
size 1 where the block does not vary), whose entries say which parameter element produced that position
of the tensor. A conv output carries the conv weight's dim-0 ids along dim 1, as a (1, O, 1, 1) block.
A dimension is *tracked* by a block when the block's size there equals the tensor's size (> 1).

Ops add *edges* between ids that must be removed together (a conv's input channel c and the previous
conv's output channel c; both operands of a residual add). At the end the connected components of the
id graph are the pruning units: removing a unit deletes every parameter slice whose id is in it.

Data-movement ops (view, permute, cat, chunk, roll, getitem, pad, ...) are handled by running the very same
op on a float64 "probe" tensor holding the ids, so reshape/flatten/channel-shuffle/patch-merging need no
hand-written index rules: the ids land exactly where the data lands.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

PIN = 0


class IdSpace:
    """Allocates ids and collects union edges; `components()` solves them at the end."""

    def __init__(self):
        self.next = 1  # 0 is PIN
        self._a: List[torch.Tensor] = []
        self._b: List[torch.Tensor] = []
        self.site: Optional[str] = None          # what is running now (the tracer sets it per op), for pin_sites
        self.pin_sites: Dict[str, int] = {}      # site -> ids it pinned directly: why channels were kept whole

    def fresh(self, n: int) -> torch.Tensor:
        ids = torch.arange(self.next, self.next + n, dtype=torch.long)
        self.next += n
        return ids

    def union(self, a: torch.Tensor, b: torch.Tensor):
        """Union a[i] with b[i] elementwise (after broadcasting). Entries < 0 (untracked) are skipped."""
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        ok = (a >= 0) & (b >= 0)
        if not bool(ok.all()):
            # a tracked element meeting an untracked one (a pad/concat with outside data) cannot be removed
            self.pin(a[(a >= 0) & (b < 0)])
            self.pin(b[(b >= 0) & (a < 0)])
            a, b = a[ok], b[ok]
        if a.numel():
            self._a.append(a.clone())
            self._b.append(b.clone())

    def union_all(self, ids: torch.Tensor):
        """All (non-negative) ids in `ids` become one unit."""
        ids = ids.reshape(-1)
        ids = ids[ids >= 0]
        if ids.numel() > 1:
            self.union(ids[:1].expand(ids.numel() - 1), ids[1:])

    def pin(self, ids: torch.Tensor, report: bool = True):
        """Keep `ids` whole; counted under the current `site` unless `report` is False (asked for by ignore=, or
        the model's outputs: not a reason to tell the user)."""
        ids = ids.reshape(-1)
        ids = ids[ids >= 0]
        if ids.numel():
            if report and self.site:
                self.pin_sites[self.site] = self.pin_sites.get(self.site, 0) + int(ids.numel())
            self.union(torch.zeros_like(ids), ids)

    def components(self) -> np.ndarray:
        """Component label per id (length `self.next`); the component of PIN is `labels[0]`. Components are
        numbered 0, 1, ... in the order of their smallest id (scipy's `connected_components` numbering)."""
        a = torch.cat(self._a).numpy() if self._a else np.zeros(0, dtype=np.int64)
        b = torch.cat(self._b).numpy() if self._b else np.zeros(0, dtype=np.int64)
        return connected_components(self.next, a, b)


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of each of `n` nodes joined by the undirected edges a[i] -- b[i], numbered by smallest member.

    Hooking + pointer jumping (Shiloach-Vishkin style): every root adopts the smallest root it touches
    through an edge, then pointers are shortcut to their roots, until no edge joins two roots. Plain numpy,
    so tracing does not pay for importing scipy.sparse (seconds on a loaded machine)."""
    parent = np.arange(n)
    while a.size:
        ra, rb = parent[a], parent[b]
        joins = ra != rb
        if not joins.any():
            break
        a, b, ra, rb = a[joins], b[joins], ra[joins], rb[joins]      # edges inside a component are done
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:                                                  # shortcut: every node points at its root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
    return np.unique(parent, return_inverse=True)[1].reshape(-1)


# ---------------------------------------------------------------------------------------------- block helpers

def tracked(block: torch.Tensor, shape: Sequence[int]) -> List[int]:
    """Dims along which `block` varies for a tensor of `shape`."""
    return [d for d in range(len(shape)) if shape[d] > 1 and block.shape[d] == shape[d]]


def align(block: torch.Tensor, ndim: int) -> torch.Tensor:
    """Left-pad a block with size-1 dims so it broadcasts against an `ndim`-dim tensor (numpy rules)."""
    while block.dim() < ndim:
        block = block.unsqueeze(0)
    return block


def reduce_to(space: IdSpace, block: torch.Tensor, keep: Sequence[int]) -> torch.Tensor:
    """Union the block along every dim not in `keep`, returning it with those dims reduced to size 1.

    This is what "a whole slab moves together" means: e.g. a Linear consumes the last dim, so every id in the
    slab x[..., j] belongs with weight column j, whatever other dims it spans."""
    other = [d for d in range(block.dim()) if d not in keep and block.shape[d] > 1]
    if not other:
        return block
    perm = list(keep) + [d for d in range(block.dim()) if d not in keep]
    moved = block.permute(perm)
    kshape = moved.shape[:len(keep)]
    flat = moved.reshape(int(np.prod(kshape)) if len(kshape) else 1, -1)  # (K, rest)
    # first non-negative entry of each row is the representative
    valid = flat >= 0
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.zeros(flat.shape[0], dtype=torch.long))
    rep = flat.gather(1, first[:, None])  # (K, 1)
    rep = torch.where(valid.any(1, keepdim=True), rep, torch.full_like(rep, -1))
    space.union(rep.expand_as(flat), flat)
    # mixed rows (tracked next to untracked data) cannot be removed
    mixed = valid.any(1) & ~valid.all(1)
    if bool(mixed.any()):
        space.pin(rep[mixed])
    out_shape = [block.shape[d] if d in keep else 1 for d in range(block.dim())]
    # rep is ordered like `keep` (sorted dims assumed by callers)
    return rep.reshape([block.shape[d] for d in keep]).reshape(out_shape) if keep else rep.reshape(out_shape)


def collapse(space: IdSpace, block: torch.Tensor, dim: int) -> torch.Tensor:
    """Union a block along one dim (the data along `dim` must not shrink)."""
    keep = [d for d in range(block.dim()) if d != dim and block.shape[d] > 1]
    return reduce_to(space, block, keep)


def compress(probe: torch.Tensor) -> Optional[torch.Tensor]:
    """Turn a full-size float64 probe back into a block: drop dims along which it is constant."""
    p = probe
    for d in range(p.dim()):
        if p.shape[d] > 1 and bool((p == p.narrow(d, 0, 1)).all()):
            p = p.narrow(d, 0, 1)
    if p.numel() == 0 or bool((p < 0).all()):
        return None
    return p.to(torch.long).contiguous()

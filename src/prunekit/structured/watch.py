"""What a verification run watches besides module outputs: the tensors that feed data-dependent ops, which
tensors a normalization over pruned channels made approximate, and which modules' outputs reach an op.

Why the inputs of data-dependent ops: a detector's final outputs are post-processed (scores above a
threshold, top-k, NMS); with random weights no score passes, so the final outputs are empty in both models
and prove nothing. The tensors that *feed* `topk`/`sort`/`nms`/`roi_align`/boolean indexing/`nonzero` are
the raw head outputs (class scores, box deltas, FPN features): those must agree. Only inputs that are not
themselves downstream of an earlier data-dependent op are compared (later ones may legitimately differ when
float error flips a near-tie).

Why taint: a LayerNorm/GroupNorm over pruned channels changes its output even with the removed channels
zeroed, so everything computed from it differs a little; everything else must still agree to float error.
Ops run inside such a normalizing module (and ops on their results) are marked approximate; the rest is
compared exactly.
"""
from __future__ import annotations

import weakref
from typing import Dict, FrozenSet, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from prunekit.graph.ops import DATA_DEPENDENT, IGNORED, op_name, tensors

APPROX, DATA = 1, 2       # flags of a tensor: downstream of an approximating norm / of a data-dependent op
_RECORD_BYTES = 1 << 30   # stop copying inputs of data-dependent ops beyond this (the comparison skips the rest)


def is_data_dependent(name: str, args, kwargs) -> bool:
    """Ops whose outputs are decided by values: the DATA_DEPENDENT table, `where(cond)` with one argument,
    `max`/`min` along a dim, and indexing with a boolean mask."""
    if name in DATA_DEPENDENT:
        return True
    if name == "where":
        return len(args) == 1 and not kwargs
    if name in ("max", "min"):
        return "dim" in kwargs or (len(args) > 1 and isinstance(args[1], int))
    if name == "__getitem__" and len(args) > 1:
        key = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in key)
    return False


class Watch(TorchFunctionMode):
    """Runs with a model: per-tensor flags (APPROX, DATA), the source modules of tensors, and the floating
    inputs of every data-dependent op keyed by (op, call number). Use as a context manager around the call;
    `close()` removes its hooks."""

    def __init__(self, model: nn.Module, approx_modules: Sequence[str] = (), record: bool = True):
        super().__init__()
        self.record = record
        self.names = {m: n for n, m in model.named_modules()}
        self._refs: Dict[int, Tuple[weakref.ref, int, FrozenSet[str]]] = {}
        self.inputs: Dict[Tuple[str, int], List[Tuple[torch.Tensor, bool]]] = {}
        self.sources: Dict[Tuple[str, int], List[str]] = {}   # modules whose outputs feed each recorded op
        self.failed: FrozenSet[str] = frozenset()             # sources of the inputs of an op that raised
        self._calls: Dict[str, int] = {}
        self.bytes = 0
        self.picks: Dict[Tuple[str, int], List[torch.Tensor]] = {}   # index outputs: what each op selected
        self.depth = 1 if "" in approx_modules else 0        # '' = a statistic in the top-level forward
        approx = set(approx_modules)
        self.handles = []
        for m, n in self.names.items():
            if n and n in approx:
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(self._leave, always_call=True))
            if m is not model and next(m.parameters(recurse=False), None) is not None:
                self.handles.append(m.register_forward_hook(self._source))

    def _enter(self, mod, args):
        self.depth += 1

    def _leave(self, mod, args, out):
        self.depth -= 1

    def _source(self, mod, args, out):
        for o in tensors(out):
            self._set(o, self.flags(o), frozenset([self.names[mod]]))

    def _get(self, t: torch.Tensor):
        entry = self._refs.get(id(t))
        return entry if entry is not None and entry[0]() is t else None

    def _set(self, t: torch.Tensor, flags: int, src: FrozenSet[str]):
        if flags or src:
            self._refs[id(t)] = (weakref.ref(t), flags, src)

    def flags(self, t: torch.Tensor) -> int:
        entry = self._get(t)
        return entry[1] if entry else 0

    def source(self, t: torch.Tensor) -> FrozenSet[str]:
        entry = self._get(t)
        return entry[2] if entry else frozenset()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        ins = tensors((args, kwargs)) if name not in IGNORED else []
        flags = APPROX if self.depth > 0 else 0
        src: FrozenSet[str] = frozenset()
        for t in ins:
            flags |= self.flags(t)
            src |= self.source(t)
        try:
            out = func(*args, **kwargs)
        except Exception:
            self.failed = src
            raise
        if name in IGNORED:
            return out
        if is_data_dependent(name, args, kwargs):
            k = self._calls.get(name, 0)
            self._calls[name] = k + 1
            keep = [t for t in ins if t.is_floating_point() and not self.flags(t) & DATA]
            size = sum(t.numel() * t.element_size() for t in keep)
            if self.record and self.bytes + size <= _RECORD_BYTES:
                self.bytes += size
                self.inputs[(name, k)] = [(t.detach().clone(), bool(self.flags(t) & APPROX)) for t in keep]
                self.sources[(name, k)] = sorted(src)
                self.picks[(name, k)] = [o.detach().clone() for o in tensors(out) if not o.is_floating_point()]
            flags |= DATA
        outs = tensors(out)
        if (name == "__setitem__" or name.endswith("_")) and args and isinstance(args[0], torch.Tensor):
            outs.append(args[0])          # written in place (`result[idx] = roi_align(...)` returns None)
        for o in outs:                    # an in-place output is one of `ins`: its own flags are included
            self._set(o, flags, src)
        return out

    def same_picks(self, other: Dict[Tuple[str, int], List[torch.Tensor]]) -> bool:
        """Did every data-dependent op run so far select the same entries as in the run that recorded `other`? Float
        error may flip a near-tie (the 50th-best proposal): then what is computed from the selection differs
        legitimately, and only the inputs of the selections can be compared."""
        def same(a, b):
            return b is not None and len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y)
                                                              for x, y in zip(a, b))
        return all(same(a, other.get(k)) for k, a in self.picks.items())     # the ops run so far

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []

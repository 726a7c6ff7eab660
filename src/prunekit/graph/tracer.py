"""Run the model once under a TorchFunctionMode and propagate channel labels through every op.

Why a torch-function tracer (and not torch.fx / torch.export / the autograd graph): it sees every op the
eager model really runs, with concrete shapes and arguments, including Python control flow, functions that
fx treats as leaves (torchvision's Swin attention), parameters used without a module (class tokens, position
tables) and `view`/`reshape` arguments (needed to place ids after a reshape). It needs no symbolic tracing,
so models that fx or export reject still trace, and it costs one forward pass. See docs/architecture.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from prunekit.errors import ConfigError, GraphError
from prunekit.graph.labels import IdSpace, collapse, reduce_to, tracked
from prunekit.graph.ops import IGNORED, op_name, tensors
from prunekit.graph.rules import apply
from prunekit.graph.rules.movement import movement


@dataclass
class Slot:
    """Ids of one dimension of one parameter or buffer."""
    name: str          # fully qualified name (first one if tied)
    dim: int
    ids: torch.Tensor  # (size,)
    is_buffer: bool = False


@dataclass
class CostTerm:
    """MACs of one op: base * prod(kept fraction of each id vector)."""
    base: int
    factors: List[torch.Tensor]
    module: str
    op: str


@dataclass
class ReshapeRecord:
    """A shape-taking op run inside `module` with literal sizes; used to fix module attributes after surgery."""
    module: str
    op: str
    sizes: List[int]
    out_blocks: List[Optional[torch.Tensor]]  # per output dim: (size, rest) ids of the block tracking it, or None


@dataclass
class Trace:
    space: IdSpace
    slots: List[Slot]
    costs: List[CostTerm]
    reshapes: List[ReshapeRecord]
    stat_ids: List[torch.Tensor]            # ids normalized together (LayerNorm/GroupNorm over them)
    conv_groups: Dict[str, int]             # module name -> groups of grouped convs seen
    grids: List[torch.Tensor] = field(default_factory=list)
    split_attrs: List[Tuple[str, str, List[torch.Tensor], str]] = field(default_factory=list)
    # (module, attribute, ids of each split part, kind): kind 'list' (the sizes), 'size' (the size of
    # every part) or 'total' (the size of the split dim) says what the attribute holds
    output: Any = None
    n_ops: int = 0
    used_uniform: bool = False   # a one-value tensor (torch.zeros(...)) met prunable channels as a scalar would
    stat_modules: List[str] = field(default_factory=list)   # module running each statistic ('' top level)


GQA_MODES = ("groups", "query_heads")


class Tracer(TorchFunctionMode):
    """Propagates labels op by op. Build with `trace(model, example_inputs)`."""

    def __init__(self, model: nn.Module, ignore: Sequence[str] = ()):
        super().__init__()
        self.gqa = "groups"
        self.space = IdSpace()
        self.labels: Dict[int, List[torch.Tensor]] = {}
        self.keep: List[Any] = []       # keep traced tensors alive so ids of objects stay unique
        self.slots: List[Slot] = []
        self.costs: List[CostTerm] = []
        self.reshapes: List[ReshapeRecord] = []
        self.stat_ids: List[torch.Tensor] = []
        self.stat_modules: List[str] = []
        self.conv_groups: Dict[str, int] = {}
        self.grids: List[torch.Tensor] = []     # multi-dim blocks (a channel dim split by a reshape)
        self.split_attrs: List[Tuple[str, str, List[torch.Tensor], str]] = []
        self.module_by_name = dict(model.named_modules())
        self._grid_seen = set()
        self.module_stack: List[str] = [""]
        self.ignore_patterns = [re.compile(p) for p in ignore]
        self.n_ops = 0
        self.pending_reshape = None   # (module, op, sizes, output) of a reshape run by the last op
        self.param_names: Dict[int, Tuple[str, bool]] = {}
        for n, p in model.named_parameters(remove_duplicate=True):
            self.param_names.setdefault(id(p), (n, False))
        for n, b in model.named_buffers(remove_duplicate=True):
            self.param_names.setdefault(id(b), (n, True))
        self.ignored_param_ids = set()
        for mname, mod in model.named_modules():
            if self._is_ignored(mname) and mname:
                for p in list(mod.parameters()) + list(mod.buffers()):
                    self.ignored_param_ids.add(id(p))
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "." not in n and self._is_ignored(n):          # the model's own parameters, by name
                self.ignored_param_ids.add(id(p))
        self.ignored_ids: List[torch.Tensor] = []   # ids of ignored parameters (all pinned)
        self.inputs: List[torch.Tensor] = []        # tensor inputs of the op being dispatched
        # ids of tensors filled with one value (torch.zeros/ones/full...) and not written since; with
        # `uniform_scalars` an elementwise op treats them as scalars (their size follows the cut when it comes
        # from an input's shape; a literal size fails the cut, which is then retried without this)
        self.uniform: set = set()
        self.uniform_scalars = True
        self.used_uniform = False

    def _is_ignored(self, mname: str) -> bool:
        return any(p.fullmatch(mname) or mname == p.pattern or mname.startswith(p.pattern + ".")
                   for p in self.ignore_patterns)

    # ------------------------------------------------------------------ labels of tensors
    def blocks(self, t) -> List[torch.Tensor]:
        if not isinstance(t, torch.Tensor):
            return []
        key = id(t)
        if key in self.labels:
            return self.labels[key]
        if key in self.param_names:
            name, is_buf = self.param_names[key]
            blocks = []
            for d, n in enumerate(t.shape):
                ids = self.space.fresh(n)
                self.slots.append(Slot(name, d, ids, is_buf))
                if id(t) in self.ignored_param_ids:
                    self.space.pin(ids, report=False)                  # asked for (ignore=)
                    self.ignored_ids.append(ids)
                if n > 1:
                    shape = [1] * t.dim()
                    shape[d] = n
                    blocks.append(ids.view(shape))
            self.set(t, blocks)
            return blocks
        return []

    def set(self, t, blocks):
        if isinstance(t, torch.Tensor):
            blocks = [b for b in blocks if b is not None and len(tracked(b, t.shape)) > 0]
            for b in blocks:
                td = tracked(b, t.shape)
                if len(td) >= 2 and id(b) not in self._grid_seen:
                    self._grid_seen.add(id(b))
                    self.grids.append(b.reshape([b.shape[d] for d in td]))
            self.labels[id(t)] = blocks
            self.keep.append(t)

    def rep(self, t: torch.Tensor, dims: Sequence[int]) -> Optional[torch.Tensor]:
        """One block over exactly `dims` (other dims unioned away), or None if no block tracks them."""
        dims = sorted(d % t.dim() for d in dims)
        found = [b for b in self.blocks(t) if set(tracked(b, t.shape)) & set(dims)]
        if not found:
            return None
        out = None
        for b in found:
            r = reduce_to(self.space, b, dims)
            if out is None:
                out = r
            else:
                self.space.union(out, r)
                out = torch.broadcasttensors(out, r)[0] if out.numel() < r.numel() else out
        return out

    def ids_along(self, t: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
        """All ids of blocks that track `dim` (no unions: for bookkeeping only)."""
        dim = dim % t.dim()
        found = [b.reshape(-1) for b in self.blocks(t) if dim in tracked(b, t.shape)]
        return torch.cat(found) if found else None

    def dim_ids(self, t: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
        """(size, rest) ids of the block tracking `dim` (no unions): row i = what sits at position i."""
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        dim = dim % t.dim()
        for b in self.blocks(t):
            if dim in tracked(b, t.shape):
                return b.movedim(dim, 0).reshape(t.shape[dim], -1)
        return None

    def rep_vec(self, t: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
        r = self.rep(t, [dim])
        return None if r is None else r.reshape(-1)

    # ------------------------------------------------------------------ coupling primitives
    def couple(self, a: torch.Tensor, dims_a: Sequence[int], b: torch.Tensor, dims_b: Sequence[int]):
        """Positions a[dims_a = i] and b[dims_b = i] hold the same channels: union them elementwise."""
        dims_a = [d % a.dim() for d in dims_a]
        dims_b = [d % b.dim() for d in dims_b]
        ra = self.rep(a, dims_a)
        rb = self.rep(b, dims_b)
        if ra is None and rb is None:
            return
        # bring both to shape (len(dims)) ordered like dims_a
        ga = self._grid(ra, a, dims_a)
        gb = self._grid(rb, b, dims_b)
        for k in range(len(dims_a)):
            size_a = a.shape[dims_a[k]]
            size_b = b.shape[dims_b[k]]
            ta = ga is not None and ga.shape[k] > 1
            tb = gb is not None and gb.shape[k] > 1
            if ta and not tb and size_b > 1 and size_b == size_a:
                ga = self._collapse_grid(ga, k)   # other side is outside data along this dim
            if tb and not ta and size_a > 1 and size_a == size_b:
                gb = self._collapse_grid(gb, k)
        if ga is not None and gb is not None:
            self.space.union(ga, gb)

    def _grid(self, r, t, dims):
        if r is None:
            return None
        g = r.permute(dims + [d for d in range(t.dim()) if d not in dims]) if r.dim() == t.dim() else r
        return g.reshape([g.shape[i] for i in range(len(dims))])

    def _collapse_grid(self, g, k):
        return collapse(self.space, g, k)

    def pin_tensor(self, t, report: bool = True):
        for b in self.blocks(t):
            self.space.pin(b, report)

    def stat(self, ids):
        if ids is not None:
            self.stat_ids.append(ids.reshape(-1))
            self.stat_modules.append(self._module())

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if name == "__iter__" and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            items = list(out)   # `a, b, c = t` iterates: same as unbind(0)
            movement(self, "unbind", torch.unbind, (args[0],), {}, tuple(items))
            return iter(items)
        if name in IGNORED:
            return out
        self.n_ops += 1
        try:
            self.dispatch(name, func, args, kwargs, out)
        except GraphError:
            raise
        except Exception as e:  # an index rule failed: say where
            raise GraphError(self.where(name) + f": prunekit could not propagate channels through this op "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:300]}). {self.hint()}") from e
        return out

    def where(self, name):
        mod = self._module()
        return f"op '{name}' in module '{mod}'" if mod else f"op '{name}' in the top-level forward of the model"

    def _module(self) -> str:
        """Innermost registered module running now ('' at the top level)."""
        return next((m for m in reversed(self.module_stack) if m and m != "?"), "")

    def hint(self):
        """An `ignore=` that makes the trace skip the failing op: its module, or at the top level the modules
        (or model parameters) whose ids its inputs carry, nearest first."""
        mod = self._module()
        if mod:
            return f"Pass ignore=['{mod}'] to leave this module untouched."
        feeders = self._feeders()
        if feeders:
            return f"Pass ignore={feeders!r} (what feeds it, nearest first) to leave those channels untouched."
        return "No parameter feeds it, so no ignore= can help; please report this op to prunekit."

    def _feeders(self) -> List[str]:
        ids = [b.reshape(-1) for t in self.inputs for b in self.blocks(t)]
        ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        ids = ids[ids > 0]
        if self.ignored_ids:
            ids = ids[~torch.isin(ids, torch.cat(self.ignored_ids))]
        names = []
        for s in sorted(self.slots, key=lambda s: -int(s.ids[0])):    # latest parameter first
            if bool(torch.isin(s.ids, ids).any()):
                owner = s.name.rpartition(".")[0] or s.name
                if owner not in names:
                    names.append(owner)
        return names

    def _only_ignored(self) -> bool:
        """Every id the op's inputs carry belongs to an ignored parameter (so the op may be left alone)."""
        ids = [b.reshape(-1) for t in self.inputs for b in self.blocks(t)]
        ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        ids = ids[ids > 0]
        if not self.ignored_ids or ids.numel() == 0:
            return False
        return bool(torch.isin(ids, torch.cat(self.ignored_ids)).all())

    def dispatch(self, name, func, args, kwargs, out):
        ins = self.inputs = tensors((args, kwargs))
        if ins and (name.endswith("_") or name == "__setitem__"):
            self.uniform.discard(id(ins[0]))           # written in place: no longer one value everywhere
        has_blocks = any(self.blocks(t) for t in ins)
        mod = self.module_stack[-1]
        ignored = bool(mod) and self._is_ignored(mod)
        self.space.site = self.where(name)
        try:
            apply(self, name, func, args, kwargs, out, has_blocks)
        except Exception:
            # an op without a rule is fine where nothing may change: in an ignored module, or on ids of
            # ignored parameters only
            if not (ignored or self._only_ignored()):
                raise
            for o in tensors(out):
                self.set(o, [])
            ignored = True
        if ignored:       # an ignored module keeps every channel it touches; its ops still count towards MACs
            for t in ins + tensors(out):
                self.pin_tensor(t, report=False)           # asked for (ignore=)
        self._finish_reshape()

    def _finish_reshape(self):
        """A view/reshape rule left its output pending: record the ids each of its output dims carries."""
        if self.pending_reshape is None:
            return
        mod, nm, sizes, o = self.pending_reshape
        self.pending_reshape = None
        per_dim = []
        for d in range(o.dim()):
            bl = [b for b in self.blocks(o) if d in tracked(b, o.shape)]
            per_dim.append(bl[0].movedim(d, 0).reshape(o.shape[d], -1) if bl else None)
        self.reshapes.append(ReshapeRecord(mod, nm, sizes, per_dim))

    def tracked_dims(self, t):
        s = set()
        for b in self.blocks(t):
            s |= set(tracked(b, t.shape))
        return s

    def cost(self, base, factors, op):
        self.costs.append(CostTerm(int(base), [f if f.dim() == 2 else f.reshape(-1, 1) for f in factors
                                               if f is not None], self.module_stack[-1], op))


def trace(model: nn.Module, example_inputs, ignore: Sequence[str] = (), gqa: str = "groups",
          uniform_scalars: bool = True) -> Trace:
    """Run `model(example_inputs)` once and return the id graph of coupled parameter slices.

    gqa: "groups" (a KV head goes with all the query heads that read it) or "query_heads" (KV heads stay;
    query heads go, the same number from every KV group). uniform_scalars: a tensor made by torch.zeros /
    ones / full (a scan's initial state) combines with channels like a scalar instead of pinning them."""
    if gqa not in GQA_MODES:
        raise ConfigError(f"gqa must be one of {GQA_MODES}, got {gqa!r}")
    tr = Tracer(model, ignore)
    tr.gqa = gqa
    tr.uniform_scalars = uniform_scalars
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def pre(mod, _inp):
        tr.module_stack.append(names.get(mod, "?"))

    def post(mod, _inp, _out):
        tr.module_stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    try:
        with torch.no_grad(), tr:
            if isinstance(example_inputs, dict):
                output = model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                output = model(*example_inputs)
            else:
                output = model(example_inputs)
        # the model's outputs keep their shape
        for o in tensors(output if not hasattr(output, "to_tuple") else output.to_tuple()):
            tr.pin_tensor(o, report=False)
    finally:
        for h in handles:
            h.remove()
    return Trace(space=tr.space, slots=tr.slots, costs=tr.costs, reshapes=tr.reshapes, stat_ids=tr.stat_ids,
                 conv_groups=tr.conv_groups, output=output, n_ops=tr.n_ops, grids=tr.grids,
                 split_attrs=tr.split_attrs, used_uniform=tr.used_uniform,
                 stat_modules=tr.stat_modules)

"""Run the model once under a TorchFunctionMode and propagate channel labels through every op.

Why a torch-function tracer (and not torch.fx / torch.export / the autograd graph): it sees every op the
eager model really runs, with concrete shapes and arguments, including Python control flow, functions that
fx treats as leaves (torchvision's Swin attention), parameters used without a module (class tokens, position
tables) and `view`/`reshape` arguments (needed to place ids after a reshape). It needs no symbolic tracing,
so models that fx or export reject still trace, and it costs one forward pass. See docs/architecture.md.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from prunekit.errors import GraphError
from prunekit.graph.labels import IdSpace, align, collapse, compress, reduce_to, tracked


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
    split_attrs: List[Tuple[str, str, List[torch.Tensor]]] = field(default_factory=list)
    output: Any = None
    n_ops: int = 0


ELEMENTWISE = {
    "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "rsub", "sub_", "__isub__",
    "mul", "__mul__", "__rmul__", "mul_", "__imul__", "div", "__truediv__", "__rtruediv__", "div_", "__itruediv__",
    "true_divide", "floor_divide", "__floordiv__", "remainder", "fmod", "pow", "__pow__", "__rpow__", "pow_",
    "maximum", "minimum", "max_elementwise", "where", "masked_fill", "masked_fill_", "addcmul", "addcdiv", "lerp",
    "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "logical_and", "logical_or", "__and__", "__or__", "bitwise_and", "bitwise_or", "atan2", "hypot",
    "copysign", "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "clamp_min_", "clamp_max_",
}
UNARY = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu", "elu_",
    "selu", "celu", "mish", "softplus", "softsign", "logsigmoid", "tanhshrink", "threshold", "rrelu", "glu_",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "dropout_",
    "exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "abs", "neg", "__neg__", "erf", "sin", "cos", "reciprocal",
    "square", "sign", "floor", "ceil", "round", "trunc", "frac", "logical_not", "__invert__", "isnan", "isinf",
    "nan_to_num", "float", "half", "double", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach",
    "detach_", "requires_grad_", "cpu", "cuda", "__pos__", "exp_", "sqrt_", "mul_scalar", "fill_", "zero_",
    "softmax", "log_softmax", "_softmax", "nan_to_num_", "bernoulli_", "uniform_", "normal_", "pin_memory",
}
MOVEMENT = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "transpose_", "t", "T", "mT", "unsqueeze",
    "squeeze", "unsqueeze_", "squeeze_", "split", "chunk", "unbind", "__getitem__", "narrow", "select",
    "index_select", "roll", "flip", "expand", "expand_as", "repeat", "repeat_interleave", "pad", "movedim",
    "moveaxis", "swapaxes", "swapdims", "view_as", "reshape_as", "pixel_shuffle", "pixel_unshuffle",
    "tensor_split", "split_with_sizes", "take_along_dim", "gather", "tile", "broadcast_to", "channel_shuffle",
    "native_channel_shuffle", "unfold", "cat", "concat", "concatenate", "stack",
}
CREATION = {
    "zeros", "ones", "empty", "full", "arange", "linspace", "randn", "rand", "randint", "zeros_like",
    "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones", "new_empty",
    "new_full", "new_tensor", "tensor", "as_tensor", "eye", "tril", "triu", "meshgrid", "bernoulli", "multinomial",
    "argmax", "argmin", "argsort", "cumsum", "nonzero", "__len__", "tril_", "triu_", "one_hot", "bucketize",
    "searchsorted",
}
REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod", "all", "any",
          "var_mean", "std_mean", "nansum", "nanmean", "vector_norm", "linalg_vector_norm"}
STAT_REDUCE = {"mean", "var", "std", "norm", "logsumexp", "var_mean", "std_mean", "nanmean", "vector_norm",
               "linalg_vector_norm"}
SPATIAL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    "max_pool2d_with_indices", "max_pool1d_with_indices", "lp_pool2d", "lp_pool1d", "fractional_max_pool2d",
    "grid_sample", "local_response_norm",
}
IGNORED = {"size", "dim", "numel", "item", "tolist", "__bool__", "__format__", "__repr__", "__len__", "stride",
           "is_contiguous", "data_ptr", "element_size", "__index__", "__int__", "__float__", "storage_offset",
           "untyped_storage", "is_floating_point", "is_complex", "nelement", "ndimension", "get_device",
           "__hash__", "__iter__", "__reversed__", "__contains__", "__array__", "numpy", "has_names",
           "_has_compatible_shallow_copy_type", "__deepcopy__", "__reduce_ex__", "__setstate__", "data", "shape",
           "dtype", "device", "is_cuda", "requires_grad", "ndim", "grad", "names", "layout", "is_leaf", "grad_fn",
           "is_sparse", "is_quantized", "is_meta", "retain_grad", "register_hook", "_version", "is_nested",
           "_base", "output_nr", "is_mkldnn", "itemsize", "nbytes", "__eq__hash"}


def op_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _tensors(x) -> List[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


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
        self.conv_groups: Dict[str, int] = {}
        self.grids: List[torch.Tensor] = []     # multi-dim blocks (a channel dim split by a reshape)
        self.split_attrs: List[Tuple[str, str, List[torch.Tensor]]] = []
        self._module_by_name = dict(model.named_modules())
        self._grid_seen = set()
        self.module_stack: List[str] = [""]
        self.ignore_patterns = [re.compile(p) for p in ignore]
        self.n_ops = 0
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
                    self.space.pin(ids)
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
                out = torch.broadcast_tensors(out, r)[0] if out.numel() < r.numel() else out
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

    def pin_tensor(self, t):
        for b in self.blocks(t):
            self.space.pin(b)

    def stat(self, ids):
        if ids is not None:
            self.stat_ids.append(ids.reshape(-1))

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if name == "__iter__" and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            items = list(out)   # `a, b, c = t` iterates: same as unbind(0)
            self.movement("unbind", torch.unbind, (args[0],), {}, tuple(items))
            return iter(items)
        if name in IGNORED:
            return out
        self.n_ops += 1
        try:
            self.dispatch(name, func, args, kwargs, out)
        except GraphError:
            raise
        except Exception as e:  # an index rule failed: say where
            raise GraphError(self._where(name) + f": prunekit could not propagate channels through this op "
                             f"({type(e).__name__}: {e}). {self._hint()}") from e
        return out

    def _where(self, name):
        mod = self.module_stack[-1] or "<model>"
        return f"op '{name}' in module '{mod}'"

    def _hint(self):
        mod = self.module_stack[-1]
        if mod:
            return f"Pass ignore=['{mod}'] to leave this module untouched."
        return "Pass ignore=[<module name>] to leave the surrounding module untouched."

    def dispatch(self, name, func, args, kwargs, out):
        ins = [t for t in _tensors((args, kwargs))]
        has_blocks = any(self.blocks(t) for t in ins)
        if self._is_ignored(self.module_stack[-1]) and self.module_stack[-1]:
            # an ignored module keeps every channel it touches; its ops still count towards MACs
            try:
                self.dispatch_rule(name, func, args, kwargs, out, ins, has_blocks)
            except GraphError:
                for o in _tensors(out):
                    self.set(o, [])
            for t in ins + _tensors(out):
                self.pin_tensor(t)
            return
        self.dispatch_rule(name, func, args, kwargs, out, ins, has_blocks)

    def dispatch_rule(self, name, func, args, kwargs, out, ins, has_blocks):
        rule = RULES.get(name)
        if rule is not None:
            rule(self, args, kwargs, out)
            return
        if name in CREATION:
            for o in _tensors(out):
                self.set(o, [])
            return
        if name in UNARY:
            if ins and isinstance(out, torch.Tensor):
                src = args[0] if args and isinstance(args[0], torch.Tensor) else ins[0]
                if src.shape == out.shape:
                    self.set(out, list(self.blocks(src)))
                    if name in ("softmax", "log_softmax", "_softmax"):
                        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                        if isinstance(dim, int):
                            self.stat(self.ids_along(src, dim))
                    return
            return self.elementwise(args, kwargs, out)
        if name in ELEMENTWISE:
            return self.elementwise(args, kwargs, out)
        if name in MOVEMENT:
            return self.movement(name, func, args, kwargs, out)
        if name in REDUCE:
            return self.reduce(name, args, kwargs, out)
        if name in SPATIAL:
            return self.spatial(args, out)
        if not has_blocks:
            for o in _tensors(out):
                self.set(o, [])
            return
        raise GraphError(self._where(name) + ": prunekit has no channel rule for this op and its inputs carry "
                         "prunable channels. " + self._hint())

    def _tracked_dims(self, t):
        s = set()
        for b in self.blocks(t):
            s |= set(tracked(b, t.shape))
        return s

    # ------------------------------------------------------------------ generic rules
    def elementwise(self, args, kwargs, out):
        outs = _tensors(out)
        if not outs:
            return
        o = outs[0]
        ins = [t for t in _tensors((args, kwargs)) if t.dim() <= o.dim()]
        nd = o.dim()
        entries = []  # (input index, aligned block)
        for i, t in enumerate(ins):
            for b in self.blocks(t):
                entries.append((i, align(b, nd)))
        if not entries:
            self.set(o, [])
            return
        shapes = [[1] * (nd - t.dim()) + list(t.shape) for t in ins]
        # outside data (untracked, full size) along a tracked dim: that dim must not shrink
        for d in range(nd):
            if o.shape[d] <= 1:
                continue
            untracked_full = any(shapes[i][d] == o.shape[d] and
                                 not any(b.shape[d] == o.shape[d] for j, b in entries if j == i)
                                 for i in range(len(ins)))
            if untracked_full:
                entries = [(i, collapse(self.space, b, d) if b.shape[d] > 1 else b) for i, b in entries]
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
                        self.space.pin(entries[y][1])
                        bx = entries[x][1]
                        for d in sorted(dy):
                            bx = collapse(self.space, bx, d) if bx.shape[d] > 1 else bx
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
                    self.space.union(bx, by)
        # output: one block per cluster of overlapping blocks (the one spanning most dims)
        result: List[torch.Tensor] = []
        for _, b in sorted(entries, key=lambda e: -sum(s > 1 for s in e[1].shape)):
            bt = {d for d in range(nd) if b.shape[d] > 1}
            if any(bt & {d for d in range(nd) if r.shape[d] > 1} for r in result):
                continue
            result.append(b)
        for oo in outs:
            if oo.shape == o.shape:
                self.set(oo, result)

    def movement(self, name, func, args, kwargs, out):
        outs = _tensors(out)
        if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
            return self.cat(name, args, kwargs, out)
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is None:
            for o in outs:
                self.set(o, [])
            return
        if name in ("view", "reshape", "unflatten", "expand", "repeat", "flatten", "view_as", "reshape_as"):
            self._record_reshape(name, args, kwargs, out)
        if name in ("chunk", "split", "tensor_split", "split_with_sizes"):
            self._equal_parts(name, src, args, kwargs, outs)
        new_blocks: Dict[int, List[torch.Tensor]] = {id(o): [] for o in outs}
        for b in self.blocks(src):
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
            pouts = _tensors(pout)
            for o, po in zip(outs, pouts):
                if po.shape != o.shape:
                    raise GraphError(self._where(name) + f": label probe has shape {tuple(po.shape)} but the op "
                                     f"returned {tuple(o.shape)}. " + self._hint())
                c = compress(po)
                if c is not None:
                    new_blocks[id(o)].append(c)
        for o in outs:
            self.set(o, new_blocks[id(o)])

    def _equal_parts(self, name, src, args, kwargs, outs):
        """chunk/split cut a channel dim by count: every part must lose the same local positions.

        A split by an explicit list of sizes can only follow pruning if the list is a module attribute
        (recorded for update); a list written literally in forward() pins the dim."""
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        dim = dim % src.dim()
        if dim not in self._tracked_dims(src):
            return
        sizes = [o.shape[dim] for o in outs]
        spec = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("chunks"))
        if isinstance(spec, (list, tuple)) and name != "chunk":
            mod_name = self.module_stack[-1]
            owner = self._module_by_name.get(mod_name)
            attr = None
            if owner is not None:
                for k, v in vars(owner).items():
                    if isinstance(v, (list, tuple)) and list(v) == list(spec) and not k.startswith("_"):
                        attr = k
                        break
            if attr is None:
                for b in self.blocks(src):
                    if b.shape[dim] > 1:
                        self.space.pin(b)
                return
            ids = self.dim_ids(src, dim)
            parts, off = [], 0
            for n in sizes:
                parts.append(ids[off:off + n])
                off += n
            self.split_attrs.append((mod_name, attr, parts))
            return
        if len(set(sizes)) != 1:
            for b in self.blocks(src):
                if b.shape[dim] > 1:
                    self.space.pin(b)
            return
        r = self.rep_vec(src, dim).view(len(sizes), sizes[0])      # (parts, per part)
        self.space.union(r[:1].expand_as(r), r)

    def _record_reshape(self, name, args, kwargs, out):
        if not isinstance(out, torch.Tensor):
            return
        sizes = [a for a in tree_flatten((args[1:], kwargs))[0] if isinstance(a, int) and not isinstance(a, bool)]
        if not sizes:
            return
        # ids per output dim, filled in by `finish_reshapes` once the output's labels exist
        self._pending_reshape = (self.module_stack[-1], name, sizes, out)

    def cat(self, name, args, kwargs, out):
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        tensors = [t for t in tensors if isinstance(t, torch.Tensor) and not (t.dim() == 1 and t.numel() == 0)]
        o = out
        if name in ("stack", "hstack", "vstack") or not isinstance(o, torch.Tensor):
            if name == "stack":
                tensors = [t.unsqueeze(dim) for t in tensors]  # plain tensors, labels handled below
            if name != "stack":
                self.set(o, [])
                for t in tensors:
                    self.pin_tensor(t)
                return
        nd = o.dim()
        dim = dim % nd
        ins = tensors
        if name == "stack":
            ins = args[0] if args else kwargs.get("tensors")
            ins = [t for t in ins if isinstance(t, torch.Tensor)]
        if len(ins) == 1 and name != "stack":
            self.set(o, list(self.blocks(ins[0])))
            return
        # 1) the concat dim: ids laid end to end (probes keep any grid structure, e.g. rotate_half on heads)
        along = []
        any_along = False
        for t in ins:
            tt = t if name != "stack" else t.unsqueeze(dim)
            bl = [b for b in self.blocks(t) if name != "stack" and dim in tracked(b, t.shape)]
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
            for b in self.blocks(t):
                b = align(b, t.dim())
                if name == "stack":
                    b = b.unsqueeze(dim)
                if b.shape[dim] > 1:
                    keep = [d for d in range(nd) if d != dim and b.shape[d] > 1]
                    if not keep:
                        continue
                    b = reduce_to(self.space, b, keep)
                others.append((i, b))
        for x in range(len(others)):
            for y in range(x + 1, len(others)):
                bx, by = others[x][1], others[y][1]
                if any(bx.shape[d] > 1 and by.shape[d] > 1 for d in range(nd)) and others[x][0] != others[y][0]:
                    self.space.union(bx, by)
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
                if tt.shape[d] > 1 and d not in self._tracked_dims(tt if name != "stack" else t):
                    for j, b in enumerate(blocks):
                        if b.shape[d] > 1:
                            blocks[j] = collapse(self.space, b, d)
        self.set(o, blocks)

    def reduce(self, name, args, kwargs, out):
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        outs = _tensors(out)
        if src is None or not outs:
            return
        dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        if name == "norm":
            dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
            keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
        if dim is None:
            dims = list(range(src.dim()))
        elif isinstance(dim, int):
            dims = [dim % src.dim()]
        else:
            dims = [d % src.dim() for d in dim]
        td = self._tracked_dims(src)
        if name in STAT_REDUCE:
            for d in dims:
                if d in td:
                    self.stat(self.ids_along(src, d))
        keep = [d for d in range(src.dim()) if d not in dims]
        blocks = []
        for b in self.blocks(src):
            if not (set(tracked(b, src.shape)) & set(keep)):
                continue
            r = reduce_to(self.space, b, [d for d in keep if b.shape[d] > 1])
            if not keepdim:
                r = r.reshape([r.shape[d] for d in keep]) if keep else r.reshape(())
            blocks.append(r)
        for o in outs:
            if o.dim() == (src.dim() if keepdim else len(keep)) and o.is_floating_point() == src.is_floating_point():
                self.set(o, blocks)
            else:
                self.set(o, [])

    def spatial(self, args, out):
        src = args[0]
        outs = _tensors(out)
        keepd = [0, 1] if src.dim() >= 3 else [0]
        blocks = []
        for b in self.blocks(src):
            if set(tracked(b, src.shape)) - set(keepd):
                b = reduce_to(self.space, b, [d for d in keepd if b.shape[d] > 1])
            blocks.append(b)
        for o in outs:
            self.set(o, blocks if o.dim() == src.dim() else [])

    def cost(self, base, factors, op):
        self.costs.append(CostTerm(int(base), [f if f.dim() == 2 else f.reshape(-1, 1) for f in factors
                                               if f is not None], self.module_stack[-1], op))


# ====================================================================================== op rules

def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def rule_linear(tr: Tracer, args, kwargs, out):
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    b = _arg(args, kwargs, 2, "bias")
    tr.couple(x, [-1], w, [1])
    rows = tr.rep_vec(w, 0)
    if b is not None:
        tr.couple(b, [0], w, [0])
    blocks = []
    if rows is not None:
        shape = [1] * out.dim()
        shape[-1] = out.shape[-1]
        blocks.append(rows.view(shape))
    for blk in tr.blocks(x):
        if out.dim() - 1 not in tracked(blk, x.shape) and x.dim() == out.dim():
            blocks.append(blk)
    tr.set(out, blocks)
    tr.cost(out.numel() * w.shape[1], [tr.dim_ids(w, 0), tr.dim_ids(w, 1)], "linear")


def rule_conv(tr: Tracer, args, kwargs, out, transpose=False):
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    b = _arg(args, kwargs, 2, "bias")
    g = _arg(args, kwargs, 6 if not transpose else 7, "groups", 1)
    if transpose:
        g = _arg(args, kwargs, 6, "groups", 1)
    if not isinstance(g, int):
        g = 1
    out_dim, in_dim = (1, 0) if transpose else (0, 1)
    C = x.shape[1]
    rows = tr.rep_vec(w, out_dim)
    cols = tr.rep_vec(w, in_dim)
    xr = tr.rep_vec(x, 1)
    if g == 1:
        tr.couple(x, [1], w, [in_dim])
    elif transpose:
        tr.pin_tensor(x)
        tr.pin_tensor(w)
        rows = None
    else:
        mod = tr.module_stack[-1]
        tr.conv_groups[mod] = g
        O = w.shape[0]
        per_in, per_out = C // g, O // g
        if xr is None:
            if rows is not None:
                tr.space.pin(rows)
        elif per_in == 1:
            # depthwise (channel multiplier per_out): input channel c feeds outputs c*m .. c*m+m-1
            tr.space.union(xr.view(g, 1), rows.view(g, per_out) if rows is not None else torch.full((g, 1), -1))
        else:
            # grouped: keep groups; remove the same local positions in every group
            xg = xr.view(g, per_in)
            tr.space.union(xg[:1].expand_as(xg), xg)
            if cols is not None:
                tr.space.union(cols.view(1, per_in), xg[:1])
            if rows is not None:
                rg = rows.view(g, per_out)
                tr.space.union(rg[:1].expand_as(rg), rg)
    if b is not None:
        tr.couple(b, [0], w, [out_dim])
    for d in range(2, w.dim()):          # kernel taps are not channels
        kid = tr.rep_vec(w, d)
        if kid is not None:
            tr.space.pin(kid)
    blocks = []
    if rows is not None:
        shape = [1] * out.dim()
        shape[1] = out.shape[1]
        blocks.append(rows.view(shape))
    tr.set(out, blocks)
    k = math.prod(w.shape[2:])
    tr.cost(out.numel() * (C // g) * k, [tr.dim_ids(out, 1), tr.dim_ids(x, 1) if g == 1 or (C // g) > 1 else None],
            "conv")


def rule_batch_norm(tr: Tracer, args, kwargs, out):
    x = args[0]
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        p = _arg(args, kwargs, i, name)
        if isinstance(p, torch.Tensor):
            tr.couple(p, [0], x, [1])
    tr.set(out, list(tr.blocks(x)))


def rule_layer_norm(tr: Tracer, args, kwargs, out):
    x = args[0]
    ns = _arg(args, kwargs, 1, "normalized_shape")
    n = len(ns) if isinstance(ns, (list, tuple, torch.Size)) else 1
    dims = list(range(x.dim() - n, x.dim()))
    w = _arg(args, kwargs, 2, "weight")
    b = _arg(args, kwargs, 3, "bias")
    affine = False
    for p in (w, b):
        if isinstance(p, torch.Tensor):
            tr.couple(p, list(range(p.dim())), x, dims)
            affine = True
    for d in dims:
        if d in tr._tracked_dims(x):
            if not affine:      # normalized_shape is a literal: that dim must keep its size
                for blk in tr.blocks(x):
                    if blk.shape[d] > 1:
                        tr.space.pin(blk)
            tr.stat(tr.ids_along(x, d))
    tr.set(out, list(tr.blocks(x)))


def rule_rms_norm(tr: Tracer, args, kwargs, out):
    rule_layer_norm(tr, (args[0], args[1], _arg(args, kwargs, 2, "weight"), None), {}, out)


def rule_group_norm(tr: Tracer, args, kwargs, out):
    x = args[0]
    G = _arg(args, kwargs, 1, "num_groups")
    w = _arg(args, kwargs, 2, "weight")
    b = _arg(args, kwargs, 3, "bias")
    xr = tr.rep_vec(x, 1)
    if xr is not None:
        xg = xr.view(G, -1)
        tr.space.union(xg[:1].expand_as(xg), xg)    # same local positions in every group
        tr.stat(xr)
    for p in (w, b):
        if isinstance(p, torch.Tensor):
            tr.couple(p, [0], x, [1])
    tr.set(out, list(tr.blocks(x)))


def rule_embedding(tr: Tracer, args, kwargs, out):
    idx, w = args[0], _arg(args, kwargs, 1, "weight")
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


def rule_prelu(tr: Tracer, args, kwargs, out):
    x, w = args[0], args[1]
    if w.numel() > 1:
        tr.couple(w, [0], x, [1])
    tr.set(out, list(tr.blocks(x)))


def rule_matmul(tr: Tracer, args, kwargs, out):
    a, b = args[0], args[1]
    if a.dim() < 2 or b.dim() < 2:
        tr.pin_tensor(a)
        tr.pin_tensor(b)
        tr.set(out, [])
        return
    nd = out.dim()
    nb = nd - 2
    # batch dims (right-aligned) + contraction dim are the same positions in both operands
    da = [d for d in range(a.dim() - 2) if a.dim() - 2 - d <= nb]
    db = [d for d in range(b.dim() - 2) if b.dim() - 2 - d <= nb]
    pa = list(range(a.dim() - 2))[-min(len(da), len(db)):] if min(len(da), len(db)) else []
    pb = list(range(b.dim() - 2))[-min(len(da), len(db)):] if min(len(da), len(db)) else []
    pairs_a, pairs_b = [], []
    for x_, y_ in zip(pa, pb):
        if a.shape[x_] == b.shape[y_]:
            pairs_a.append(x_)
            pairs_b.append(y_)
    tr.couple(a, pairs_a + [a.dim() - 1], b, pairs_b + [b.dim() - 2])
    blocks = []
    ra = tr.rep(a, [d for d in range(a.dim()) if d != a.dim() - 1 and d in tr._tracked_dims(a)])
    rb = tr.rep(b, [d for d in range(b.dim()) if d != b.dim() - 2 and d in tr._tracked_dims(b)])
    if rb is not None:
        blocks.append(align(rb, nd))
    if ra is not None:
        ra = align(ra, nd)
        if rb is None or not any(ra.shape[d] > 1 and align(rb, nd).shape[d] > 1 for d in range(nd)):
            blocks.append(ra)
    tr.set(out, blocks)
    # MACs scale with every kept output position and the kept contraction length
    factors = [tr.dim_ids(out, d) for d in range(out.dim())] + [tr.dim_ids(a, a.dim() - 1)]
    tr.cost(out.numel() * a.shape[-1], factors, "matmul")


def rule_sdpa(tr: Tracer, args, kwargs, out):
    q, k, v = args[0], args[1], args[2]
    gqa = bool(kwargs.get("enable_gqa", False))
    hq = q.shape[-3] if q.dim() >= 3 else 1
    hk = k.shape[-3] if k.dim() >= 3 else 1
    if gqa and hq != hk and hk > 0 and tr.gqa == "query_heads":
        rep = hq // hk
        # kv heads stay; query head j of every group goes together, so each group keeps the same count
        for t in (k, v):
            tr.pin_tensor(t)
        rq = tr.rep(q, [q.dim() - 3])
        blocks = []
        if rq is not None:
            g = rq.reshape(hk, rep)
            tr.space.union(g[:1].expand_as(g), g)
            shape = [1] * out.dim()
            shape[-3] = hq
            blocks.append(rq.reshape(shape))      # o_proj columns of head i go with query head i
        tr.set(out, blocks)
    elif gqa and hq != hk and hk > 0:
        rep = hq // hk
        # query head i uses kv head i // rep: tie each query head group to its kv head
        for t in (k, v):
            rk = tr.rep(t, [t.dim() - 3])
            rq = tr.rep(q, [q.dim() - 3])
            if rk is not None and rq is not None:
                tr.space.union(rq.reshape(hk, rep), rk.reshape(hk, 1))
            elif rq is not None or rk is not None:
                tr.pin_tensor(q)
                tr.pin_tensor(t)
        qd = [q.dim() - 3]
        tr.couple(q, [q.dim() - 1], k, [k.dim() - 1])
        qb = tr.rep(q, qd)
        blocks = []
        vb = tr.rep(v, [v.dim() - 3, v.dim() - 1])
        if vb is not None:
            vv = vb.reshape(hk, 1, v.shape[-1]).expand(hk, rep, v.shape[-1]).reshape(hq, v.shape[-1])
            shape = [1] * out.dim()
            shape[-3], shape[-1] = hq, v.shape[-1]
            blocks.append(vv.reshape(shape))
        tr.set(out, blocks)
    else:
        kt = k.transpose(-2, -1)
        tr.set(kt, [b.transpose(-2, -1) if b.dim() >= 2 else b for b in tr.blocks(k)])
        scores = torch.empty(q.shape[:-1] + (k.shape[-2],))
        rule_matmul(tr, (q, kt), {}, scores)
        mask = _arg(args, kwargs, 3, "attn_mask")
        if isinstance(mask, torch.Tensor):
            tr.elementwise((scores, mask), {}, scores)
        rule_matmul(tr, (scores, v), {}, out)
    if gqa and hq != hk:
        tr.cost(q.numel() * k.shape[-2] * 2, [tr.dim_ids(q, q.dim() - 3)], "sdpa")


def rule_mha(tr: Tracer, args, kwargs, out):
    # nn.MultiheadAttention requires its inner width to equal embed_dim: leave it untouched for now
    for t in _tensors((args, kwargs)):
        tr.pin_tensor(t)
    outs = _tensors(out)
    for o in outs:
        tr.set(o, [])
    q = args[0]
    E = q.shape[-1]
    tr.cost(q.numel() * E * 4 + q.numel() * q.shape[0] * 2, [], "mha")


def rule_normalize(tr: Tracer, args, kwargs, out):
    x = args[0]
    dim = _arg(args, kwargs, 2, "dim", 1)
    tr.stat(tr.ids_along(x, dim))
    tr.set(out, list(tr.blocks(x)))


def rule_setitem(tr: Tracer, args, kwargs, out):
    target, value = args[0], args[2] if len(args) > 2 else None
    if tr.blocks(target) or (isinstance(value, torch.Tensor) and tr.blocks(value)):
        tr.pin_tensor(target)
        if isinstance(value, torch.Tensor):
            tr.pin_tensor(value)


def rule_einsum(tr: Tracer, args, kwargs, out):
    eq = args[0].replace(" ", "")
    ops = args[1:] if not (len(args) == 2 and isinstance(args[1], (list, tuple))) else list(args[1])
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    terms = lhs.split(",")
    if "..." in eq or len(terms) != len(ops):
        for t in ops:
            tr.pin_tensor(t)
        tr.set(out, [])
        return
    if rhs is None:
        rhs = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    # letters shared by two operands are coupled
    for i in range(len(ops)):
        for j in range(i + 1, len(ops)):
            shared = [c for c in terms[i] if c in terms[j]]
            if shared:
                tr.couple(ops[i], [terms[i].index(c) for c in shared], ops[j], [terms[j].index(c) for c in shared])
    blocks = []
    covered = set()
    for i, t in enumerate(ops):
        dims = [terms[i].index(c) for c in rhs if c in terms[i]]
        dims = [d for d in dims if d in tr._tracked_dims(t)]
        if not dims:
            continue
        r = tr.rep(t, dims)
        letters = [terms[i][d] for d in sorted(dims)]
        if covered & set(letters):
            continue
        covered |= set(letters)
        grid = r.reshape([t.shape[d] for d in sorted(dims)])
        # place into output order
        order = sorted(range(len(letters)), key=lambda k: rhs.index(letters[k]))
        grid = grid.permute(order)
        shape = [1] * out.dim()
        for k in order:
            shape[rhs.index(letters[k])] = t.shape[sorted(dims)[k]]
        blocks.append(grid.reshape(shape))
    tr.set(out, blocks)
    # MACs: every output element sums over the letters that appear in no output position
    summed = [c for c in dict.fromkeys(lhs.replace(",", "")) if c not in rhs]
    size = {}
    for t, term in zip(ops, terms):
        for d, c in enumerate(term):
            size[c] = max(size.get(c, 1), t.shape[d])
    factors = [tr.dim_ids(out, d) for d in range(out.dim())]
    for c in summed:
        for t, term in zip(ops, terms):
            if c in term:
                factors.append(tr.dim_ids(t, term.index(c)))
                break
    tr.cost(out.numel() * math.prod(size[c] for c in summed), factors, "einsum")


def rule_baddbmm(tr: Tracer, args, kwargs, out):
    inp, b1, b2 = args[0], args[1], args[2]
    tmp = torch.empty(out.shape)
    rule_matmul(tr, (b1, b2), {}, tmp)
    tr.elementwise((tmp, inp), {}, out)


def rule_addmm(tr: Tracer, args, kwargs, out):
    # addmm(bias, x, w_t) is how some code writes a Linear
    inp, m1, m2 = args[0], args[1], args[2]
    tmp = torch.empty(out.shape)
    rule_matmul(tr, (m1, m2), {}, tmp)
    tr.elementwise((tmp, inp), {}, out)


RULES: Dict[str, Callable] = {
    "linear": rule_linear,
    "conv1d": rule_conv, "conv2d": rule_conv, "conv3d": rule_conv,
    "conv_transpose1d": lambda tr, a, k, o: rule_conv(tr, a, k, o, transpose=True),
    "conv_transpose2d": lambda tr, a, k, o: rule_conv(tr, a, k, o, transpose=True),
    "conv_transpose3d": lambda tr, a, k, o: rule_conv(tr, a, k, o, transpose=True),
    "batch_norm": rule_batch_norm, "instance_norm": rule_batch_norm,   # same per-channel parameters
    "layer_norm": rule_layer_norm, "rms_norm": rule_rms_norm, "group_norm": rule_group_norm,
    "embedding": rule_embedding, "prelu": rule_prelu,
    "matmul": rule_matmul, "__matmul__": rule_matmul, "bmm": rule_matmul, "mm": rule_matmul,
    "scaled_dot_product_attention": rule_sdpa,
    "multi_head_attention_forward": rule_mha,
    "__setitem__": rule_setitem, "normalize": rule_normalize, "einsum": rule_einsum, "baddbmm": rule_baddbmm, "addmm": rule_addmm,
}


def trace(model: nn.Module, example_inputs, ignore: Sequence[str] = (), gqa: str = "groups") -> Trace:
    """Run `model(example_inputs)` once and return the id graph of coupled parameter slices.

    gqa: "groups" (a KV head goes with all the query heads that read it) or "query_heads" (KV heads stay;
    query heads go, the same number from every KV group)."""
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {GQA_MODES}, got {gqa!r}")
    tr = Tracer(model, ignore)
    tr.gqa = gqa
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def pre(mod, _inp):
        tr.module_stack.append(names.get(mod, "?"))

    def post(mod, _inp, _out):
        tr.module_stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    tr._pending_reshape = None
    orig_dispatch = tr.dispatch

    def dispatch_and_finish(name, func, args, kwargs, out):
        orig_dispatch(name, func, args, kwargs, out)
        if tr._pending_reshape is not None:
            mod, nm, sizes, o = tr._pending_reshape
            tr._pending_reshape = None
            per_dim = []
            for d in range(o.dim()):
                bl = [b for b in tr.blocks(o) if d in tracked(b, o.shape)]
                per_dim.append(bl[0].movedim(d, 0).reshape(o.shape[d], -1) if bl else None)
            tr.reshapes.append(ReshapeRecord(mod, nm, sizes, per_dim))
    tr.dispatch = dispatch_and_finish
    try:
        with torch.no_grad(), tr:
            if isinstance(example_inputs, dict):
                output = model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                output = model(*example_inputs)
            else:
                output = model(example_inputs)
        # the model's outputs keep their shape
        for o in _tensors(output if not hasattr(output, "to_tuple") else output.to_tuple()):
            tr.pin_tensor(o)
    finally:
        for h in handles:
            h.remove()
    return Trace(space=tr.space, slots=tr.slots, costs=tr.costs, reshapes=tr.reshapes, stat_ids=tr.stat_ids,
                 conv_groups=tr.conv_groups, output=output, n_ops=tr.n_ops, grids=tr.grids,
                 split_attrs=tr.split_attrs)

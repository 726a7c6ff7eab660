"""Check a structured cut: the pruned model must compute what the dense model computes with the removed
slices zeroed.

Zeroing every removed slice (a producer's rows and bias, BN/norm entries, a consumer's input columns) makes
the dense model's removed channels contribute exactly nothing, so a correct cut reproduces it up to float
error. When it does not, some code reads a size at run time (`x / sqrt(x.shape[1])`, a mean over channels,
`labels = idx % num_classes`) and the pruned model computes a different function: that must not pass
silently. The dense run happens on the original model with the slices zeroed in place and restored
bit-identically afterwards, so no second copy of the model is needed.

Normalizations over a pruned dimension (LayerNorm/GroupNorm/RMSNorm, softmax over channels; the graph marks
such groups inexact and names the modules taking the statistic) change with the width even when the removed
channels are zero: tensors computed from those modules are reported as approximate with the measured
difference; everything else (modules upstream of or beside them) is still compared exactly.

Besides every module output and the model outputs, the inputs of data-dependent ops (top-k, sort, NMS,
roi_align, boolean indexing, nonzero) are compared (watch.py): a detector's post-processed outputs are empty
under random weights, the raw scores feeding its post-processing are not.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from prunekit.batch import call_model, eval_mode
from prunekit.errors import VerificationError
from prunekit.structured.watch import APPROX, DATA, Watch

# stop keeping per-module outputs of the pruned run beyond this many bytes (the model output is always kept)
_KEEP_BYTES = 1 << 30


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference that float error explains: 4096 ulps of the dtype, at most 5%.

    float32 -> 4.9e-4, float64 -> 9.1e-13, bfloat16/float16 -> 0.05. Sizes read at run time change outputs
    by far more (dividing by sqrt(C) after removing 30% of C: 0.2)."""
    return min(0.05, torch.finfo(dtype).eps * 4096) if dtype.is_floating_point else 0.0


def tensors_of(out: Any) -> List[torch.Tensor]:
    """Every tensor in a (possibly nested) model output; Hugging Face ModelOutputs via `to_tuple()`."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def removed_slices_zeroed(model: nn.Module, kept: Dict[str, Dict[int, List[int]]]) -> Iterator[None]:
    """Zero, in place, every slice of `model`'s parameters that `kept` drops; restore the exact values after.

    Only the dropped slices are saved (never a copy of the model). Buffers are left alone: with a norm's
    weight and bias zeroed its running statistics no longer matter."""
    params = dict(model.named_parameters(remove_duplicate=True))
    saved: List[Tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for name, dims in kept.items():
            p = params.get(name)
            if p is None:
                continue
            for dim, keep in dims.items():
                gone = torch.ones(p.shape[int(dim)], dtype=torch.bool)
                gone[torch.as_tensor(keep, dtype=torch.long)] = False
                idx = torch.nonzero(gone).flatten().to(p.device)
                if idx.numel():
                    saved.append((p, int(dim), idx, p.index_select(int(dim), idx).clone()))
        try:
            for p, dim, idx, _ in saved:
                p.index_fill_(dim, idx, 0.0)
            yield
        finally:
            for p, dim, idx, values in reversed(saved):
                p.index_copy_(dim, idx, values)


class _Recorder:
    """Forward hooks on every module: outputs per (module name, call number), in completion order."""

    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules()}
        self.calls: Dict[str, int] = {}
        self.order: List[Tuple[str, int]] = []
        self.handles = [m.register_forward_hook(self._post) for m in model.modules()]

    def _post(self, mod, _args, out):
        name = self.names.get(mod, "?")
        k = self.calls.get(name, 0)
        self.calls[name] = k + 1
        self.on_output((name, k), tensors_of(out))

    def on_output(self, key, outs):
        raise NotImplementedError  # subclasses decide what to do with each module output

    def remove(self):
        for h in self.handles:
            h.remove()


class _Keep(_Recorder):
    def __init__(self, model):
        super().__init__(model)
        self.outputs: Dict[Tuple[str, int], List[torch.Tensor]] = {}
        self.bytes = 0

    def on_output(self, key, outs):
        outs = [t for t in outs if t.is_floating_point()]
        size = sum(t.numel() * t.element_size() for t in outs)
        if key[0] and self.bytes + size > _KEEP_BYTES:
            return
        self.bytes += size
        outs = [t.detach().clone() for t in outs]        # a later in-place op (ReLU(inplace=True)) may change it
        self.order.append(key)
        self.outputs[key] = outs


class _Compare(_Recorder):
    def __init__(self, model, reference: Dict[Tuple[str, int], List[torch.Tensor]], watch: Watch, picks: Dict):
        super().__init__(model)
        self.reference = reference
        self.picks = picks                  # the pruned run's selections (Watch.picks)
        self.watch = watch
        self.worst = 0.0
        self.approx_worst = 0.0
        self.compared = 0
        self.first: Optional[Tuple[str, float]] = None

    def on_output(self, key, outs):
        ref = self.reference.get(key)
        if ref is None or not key[0]:
            return
        outs = [t.detach() for t in outs if t.is_floating_point()]
        for dense, pruned in zip(outs, ref):
            d = relative_difference(dense, pruned)
            if d is None:
                continue
            self.compared += 1
            if self.watch.flags(dense) & APPROX or (self.watch.flags(dense) & DATA and not self.watch.same_picks(
                    self.picks)):
                self.approx_worst = max(self.approx_worst, d)
                continue
            self.worst = max(self.worst, d)
            if self.first is None and d > tolerance(pruned.dtype):
                self.first = (key[0], d)


def _aligned(dense: torch.Tensor, pruned: torch.Tensor) -> Optional[torch.Tensor]:
    """`dense` restricted to the positions the pruned tensor kept, found as the positions that are not
    exactly zero along each shrunk dim; None when that does not single them out."""
    if dense.dim() != pruned.dim():
        return None
    for k in range(dense.dim()):
        if dense.shape[k] == pruned.shape[k]:
            continue
        if dense.shape[k] < pruned.shape[k]:
            return None
        nonzero = dense.movedim(k, 0).reshape(dense.shape[k], -1).ne(0).any(1)
        if int(nonzero.sum()) != pruned.shape[k]:
            return None
        dense = dense.index_select(k, torch.nonzero(nonzero).flatten())
    return dense


def relative_difference(dense: torch.Tensor, pruned: torch.Tensor) -> Optional[float]:
    """max |dense - pruned| / max |dense| over the positions both hold; None if they cannot be aligned."""
    if dense.shape != pruned.shape:
        dense = _aligned(dense, pruned)
        if dense is None:
            return None
    if dense.numel() == 0:
        return 0.0
    a, b = dense.detach().double(), pruned.detach().double().to(dense.device)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return 0.0 if torch.equal(a.nan_to_num(), b.nan_to_num()) else float("inf")
    scale = a.abs().max().clamp_min(torch.finfo(dense.dtype).tiny)
    return float((a - b).abs().max() / scale)


@dataclasses.dataclass
class Verification:
    """What the comparison of the pruned model with the dense-with-zeros model found."""
    mode: str                 # "exact" (float error only), "approximate" (a norm spans pruned channels), "off"
    max_rel_diff: float       # over the model outputs
    tolerance: float
    modules_compared: int = 0
    max_module_rel_diff: float = 0.0          # over the module outputs compared exactly
    approximate_modules: List[str] = dataclasses.field(default_factory=list)   # norms over pruned channels
    max_approx_rel_diff: float = 0.0          # over the tensors computed from them (reported, not checked)
    data_inputs_compared: int = 0             # inputs of data-dependent ops (raw head outputs) compared

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Record:
    """A run of the pruned model kept for `verify_cut`: outputs, per-module outputs, data-dependent inputs."""
    outputs: List[torch.Tensor]
    modules: Dict[Tuple[str, int], List[torch.Tensor]]
    data_inputs: Dict[Tuple[str, int], List[Tuple[torch.Tensor, bool]]]
    picks: Dict[Tuple[str, int], List[torch.Tensor]] = dataclasses.field(default_factory=dict)


def record_outputs(model: nn.Module, example_inputs, modules: bool = True) -> Record:
    """Run `model` (no grad, eval mode, as the dense run in verify_cut: dropout off) keeping its outputs and
    (`modules`) every module's floating outputs and the inputs of its data-dependent ops."""
    if not modules:
        with eval_mode(model), torch.no_grad():
            return Record(tensors_of(call_model(model, example_inputs)), {}, {}, {})
    rec, watch = _Keep(model), Watch(model)
    try:
        with eval_mode(model), torch.no_grad(), watch:
            out = tensors_of(call_model(model, example_inputs))
    finally:
        rec.remove()
        watch.close()
    return Record(out, rec.outputs, watch.inputs, watch.picks)


def verify_cut(model: nn.Module, kept: Dict[str, Dict[int, List[int]]], example_inputs, pruned: Record,
               approx_modules: Sequence[str] = ()) -> Verification:
    """Run `model` with the slices `kept` drops zeroed in place (restored after) and compare its module
    outputs, the inputs of its data-dependent ops and its outputs with those of the pruned model
    (`record_outputs`).

    Tensors computed from `approx_modules` (normalizations over pruned channels; '' = the top-level forward)
    are measured and reported; any other difference raises VerificationError naming the first module (in
    completion order) whose output diverges, or the data-dependent op whose input does."""
    watch = Watch(model, approx_modules)
    cmp = _Compare(model, pruned.modules, watch, pruned.picks)
    try:
        with eval_mode(model), removed_slices_zeroed(model, kept), torch.no_grad(), watch:
            dense_out = tensors_of(call_model(model, example_inputs))
    finally:
        cmp.remove()
        watch.close()
    tol = max((tolerance(t.dtype) for t in dense_out if t.is_floating_point()), default=tolerance(torch.float32))
    worst, approx_worst, shape_change = 0.0, cmp.approx_worst, None
    for i, (a, b) in enumerate(zip(dense_out, pruned.outputs)):
        loose = watch.flags(a) & APPROX or (watch.flags(a) & DATA and not watch.same_picks(pruned.picks))
        if a.shape != b.shape:
            if not (loose and watch.flags(a) & DATA):      # a count decided by approximate scores may change
                shape_change = shape_change or (i, tuple(a.shape), tuple(b.shape))
            continue
        d = relative_difference(a, b) if a.is_floating_point() else (0.0 if torch.equal(a, b) else float("inf"))
        if loose:
            approx_worst = max(approx_worst, d)
        else:
            worst = max(worst, d)
    if len(dense_out) != len(pruned.outputs):
        shape_change = shape_change or (len(dense_out), f"{len(dense_out)} tensors", f"{len(pruned.outputs)} tensors")
    n_data, data_first, approx_worst = _compare_data_inputs(watch, pruned.data_inputs, tol, approx_worst)
    result = Verification("approximate" if approx_modules else "exact", worst, tol, cmp.compared, cmp.worst,
                          sorted(approx_modules), approx_worst, n_data)
    if worst > tol or shape_change is not None or cmp.first is not None or data_first is not None:
        raise VerificationError(_mismatch_message(model, cmp.first, data_first, worst, tol, shape_change))
    return result


def _compare_data_inputs(watch: Watch, pruned: Dict, tol: float, approx_worst: float):
    """Compare the inputs of data-dependent ops, call by call: (number compared, first mismatch or None, the
    worst difference of approximate ones). An input that changed shape and cannot be aligned is a mismatch
    even where a norm makes values approximate: a norm does not change which positions exist."""
    n, first = 0, None
    for key, dense in watch.inputs.items():
        ref = pruned.get(key)
        if ref is None:
            continue
        for (a, loose), (b, _) in zip(dense, ref):
            d = relative_difference(a, b)
            n += 1
            if d is None:
                why = f"its shape is {tuple(b.shape)} instead of {tuple(a.shape)} (positions shifted)"
            elif loose:
                approx_worst = max(approx_worst, d)
                continue
            elif d > tol:
                why = f"it differs by {d:.3g} (relative)"
            else:
                continue
            first = first or (key, watch.sources.get(key, []), why)
    return n, first, approx_worst


def _mismatch_message(model, first, data_first, worst, tol, shape_change) -> str:
    if shape_change is not None:
        i, a, b = shape_change
        what = f"output {i} has shape {b} instead of {a}"
    elif data_first is not None and first is None:
        (op, k), sources, why = data_first
        fix = f"ignore={sources!r}" if sources else "ignore= naming the modules that produce it"
        return (f"structured pruning changed what the model computes: the input of data-dependent op '{op}' "
                f"(call {k}) does not match the dense model with the removed channels zeroed: {why}; the "
                f"post-processing reads it (e.g. labels = index % num_classes). Pass {fix} to keep the channels "
                f"of the modules that produce it, or verify=False to accept the difference.")
    else:
        what = f"the outputs differ by {worst:.3g} (relative; tolerance {tol:.1e})"
    if first is not None:
        name, d = first
        cls = type(model.get_submodule(name)).__name__
        where = (f"first diverging module: '{name}' ({cls}, relative difference {d:.3g}); it probably computes "
                 f"with a size read at run time (e.g. x / sqrt(x.shape[1])). Pass ignore=['{name}']")
    else:
        where = (f"no submodule output diverges, so {type(model).__name__}.forward itself reads a pruned size "
                 f"(e.g. labels = index % num_classes). Pass ignore= naming the modules that produce its "
                 f"outputs (e.g. the classification head)")
    return (f"structured pruning changed what the model computes: {what} compared with the dense model with "
            f"the removed channels zeroed; {where}, or verify=False to accept the difference.")

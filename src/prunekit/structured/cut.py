"""Cut a copy of the model along the graph's units, check that the copy runs and computes what the dense
model computes with the removed channels zeroed (verify.py), and redo the cut around modules that break."""
from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from prunekit.batch import call_model, eval_mode
from prunekit.errors import GraphError
from prunekit.graph.groups import DependencyGraph
from prunekit.models import hf
from prunekit.structured.source import shape_attrs
from prunekit.structured.surgery import apply_kept, is_known_module
from prunekit.structured.verify import Verification, record_outputs, tensors_of, tolerance, verify_cut
from prunekit.structured.watch import Watch

# ------------------------------------------------------------------------------------------- handler

def _owners(graph: DependencyGraph, ids: torch.Tensor) -> List[str]:
    """Modules (or model parameters) whose parameter ids appear in `ids`."""
    ids = ids.reshape(-1)
    names = []
    for s in graph.trace.slots:
        if bool(torch.isin(s.ids, ids).any()):
            owner = s.name.rpartition(".")[0] or s.name
            if owner not in names:
                names.append(owner)
    return names


def _literal_attr_updates(graph: DependencyGraph, model: nn.Module, removed) -> List[List]:
    """Module attributes that hold a size used literally in a reshape (e.g. `num_heads`): old -> new."""
    flag = graph.removed_comps(removed)
    updates: Dict[tuple, int] = {}
    for rec in graph.trace.reshapes:
        if len(rec.sizes) != len(rec.out_blocks):
            continue
        for d, ids in enumerate(rec.out_blocks):
            if ids is None:
                continue
            old = ids.shape[0]
            ids = ids.numpy()
            alive = ~flag[graph.comp_of_id[np.where(ids >= 0, ids, 0)]] | (ids < 0)
            new = int(alive.any(1).sum())       # positions along the dim that keep any element
            if new == old or rec.sizes[d] != old:
                continue
            try:
                mod = model.get_submodule(rec.module) if rec.module else model
            except AttributeError:
                continue
            if is_known_module(mod):
                continue
            candidates = [a for a, v in vars(mod).items()
                          if not a.startswith("_") and isinstance(v, int) and not isinstance(v, bool) and v == old]
            used = shape_attrs(type(mod)) if len(candidates) > 1 else None
            if used and set(candidates) & used:       # several ints hold this size: the ones the code reshapes with
                candidates = [a for a in candidates if a in used]
            for attr in candidates:
                key = (rec.module, attr)
                if updates.get(key, new) != new:
                    where = f"module '{rec.module}'" if rec.module else "the model"
                    fix = [rec.module] if rec.module else _owners(graph, rec.out_blocks[d])
                    raise GraphError(f"op '{rec.op}': {where} attribute '{attr}'={old} would need two new "
                                     f"values ({updates[key]} and {new}); pass ignore={fix!r}")
                updates[key] = new
    out = [[m, a, v] for (m, a), v in sorted(updates.items())]
    for mod, attr, parts, kind in graph.trace.split_attrs:      # split sizes kept in a module attribute
        new_sizes = []
        for p in parts:
            a = p.numpy()
            alive = ~flag[graph.comp_of_id[np.where(a >= 0, a, 0)]] | (a < 0)
            new_sizes.append(int(alive.any(1).sum()))
        value = {"list": new_sizes, "size": new_sizes[0], "total": sum(new_sizes)}[kind]
        if [mod, attr, value] not in out:
            out.append([mod, attr, value])
    return out


def run_model(model, example_inputs):
    with torch.no_grad():
        return call_model(model, example_inputs)


def remove_units(model: nn.Module, graph: DependencyGraph, removed: Dict[int, torch.Tensor]):
    """Lower-level API: cut exactly the given units ({group index: bool mask}) from a copy of `model`.

    Returns (pruned copy, kept indices, attribute updates). `model` is not modified."""
    kept = graph.kept_indices(removed)
    attrs = _literal_attr_updates(graph, model, removed)
    pruned = copy.deepcopy(model)
    apply_kept(pruned, kept, attrs)
    if hf.is_hf(pruned):
        hf.after_surgery(pruned, model.config)
    return pruned, kept, attrs


def _failing_op_feeders(pruned: nn.Module, example_inputs) -> List[str]:
    """Modules with parameters whose outputs reach the op that fails in the top-level forward."""
    watch = Watch(pruned, record=False)
    try:
        with watch:
            run_model(pruned, example_inputs)
    except Exception:
        pass
    finally:
        watch.close()
    return sorted(watch.failed)


def _validate(pruned, example_inputs, base_out, record: Dict, modules: bool = False):
    """Run the pruned model; None if it works with unchanged output shapes, else (innermost module, error).

    `record` receives the pruned model's outputs and (`modules`) per-module outputs, for verify_cut."""
    stack = [""]
    names = {m: n for n, m in pruned.named_modules()}
    done = [""]        # the last module with parameters of its own that finished: what feeds a top-level op
    hooks = []

    def pre(mod, args):
        stack.append(names[mod])

    def post(mod, args, out):
        stack.pop()
        if next(mod.parameters(recurse=False), None) is not None:
            done.append(names[mod])

    for m in pruned.modules():
        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    try:
        record["run"] = run = record_outputs(pruned, example_inputs, modules)
        new_out = run.outputs
    except Exception as e:
        feeders = _failing_op_feeders(pruned, example_inputs) if not stack[-1] else []
        return stack[-1], " ".join(f"{type(e).__name__}: {e}".split())[:300], feeders
    finally:
        for h in hooks:
            h.remove()
    for a, b in zip(base_out, new_out):
        if a.shape != b.shape:
            return "", f"pruning changed an output shape {tuple(a.shape)} -> {tuple(b.shape)}", [done[-1]]
    return None


@dataclasses.dataclass
class Cut:
    graph: DependencyGraph
    removed: Dict[int, torch.Tensor]
    pruned: nn.Module
    kept: Dict[str, Dict[int, List[int]]]
    attrs: List[List]
    ignore: List[str]
    auto_ignored: List[str]
    verification: Verification


def cut_valid(model: nn.Module, example_inputs, choose: Callable[[DependencyGraph], Dict[int, torch.Tensor]],
              ignore: Sequence[str] = (), graph: Optional[DependencyGraph] = None, attempts: int = 8,
              gqa: str = "groups", verify: bool = True) -> Cut:
    """Trace, let `choose(graph)` pick units to remove, cut a copy, and check the copy runs.

    When the cut copy fails inside some module (its code derives one size from another, e.g.
    `reshape(B, N, C)` with C the input width but the heads pruned), every module of that class is added to
    `ignore` and the cut is redone. With `verify`, the copy must then compute what `model` computes with the
    removed slices zeroed (zeroed in place and restored bit-identically), else VerificationError. `model` is
    left as it was."""
    ignore = list(ignore)
    auto_ignored: List[str] = []
    uniform = True
    for attempt in range(attempts):
        if graph is None or attempt > 0:
            with eval_mode(model):
                graph = DependencyGraph(model, example_inputs, ignore=ignore, gqa=gqa, uniform_scalars=uniform)
        removed = choose(graph)
        pruned, kept, attrs = remove_units(model, graph, removed)
        record: Dict = {}
        # with verify, output shapes are compared with the dense model with the removed slices zeroed, not
        # with the original: post-processed outputs (detections) may differ in number from the original's
        base_out = [] if verify and kept else tensors_of(graph.trace.output)
        approx = sorted({n for gi, mask in removed.items() if bool(mask.any()) for n in graph.groups[gi].norms})
        failure = _validate(pruned, example_inputs, base_out, record, modules=verify and bool(kept))
        if failure is None:
            check = Verification("exact" if verify else "off", 0.0, tolerance(torch.float32))
            if verify and kept:
                check = verify_cut(model, kept, example_inputs, record["run"], approx)
            return Cut(graph, removed, pruned, kept, attrs, ignore, auto_ignored, check)
        mod_name, err, feeders = failure
        if uniform and graph.trace.used_uniform:
            uniform = False      # a torch.zeros(...) state sized by a literal: let it pin the channels it meets
            continue
        if not mod_name:
            feeders = [f for f in feeders if f]
            fix = f"pass ignore={ignore + feeders!r} to keep the channels of the modules that feed it" \
                if feeders else "prune with a smaller ratio"
            raise GraphError(f"the pruned model fails in the top-level forward of the model ({err}); {fix}.")
        cls = type(model.get_submodule(mod_name))
        same = [n for n, m in model.named_modules() if type(m) is cls and n]
        new = [re.escape(n) for n in same if re.escape(n) not in ignore]
        if not new or cls in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
            raise GraphError(f"the pruned model fails to run in module '{mod_name}' ({err}). "
                             f"It probably computes a size from another one (e.g. head_dim = width // num_heads);"
                             f" pass ignore={ignore + [mod_name]!r} to leave it untouched.")
        ignore += new
        auto_ignored.append(f"{cls.__name__} ({len(new)} modules): {err}")
        warnings.warn(f"pruning {cls.__name__} modules breaks their forward ({err}); leaving all "
                      f"{len(new)} of them untouched (as if ignore= named them) and pruning the rest", stacklevel=3)
    raise GraphError(f"could not find a valid pruning after {attempts} attempts (auto-ignored: {auto_ignored}); "
                     f"pass ignore={ignore + [mod_name]!r} or a smaller ratio")

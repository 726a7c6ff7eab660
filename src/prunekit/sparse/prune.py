"""`pk.Sparse`: one-shot weight sparsity (magnitude / Wanda / SparseGPT, unstructured or N:M, optional OWL).

    res = pk.prune(model, pk.Sparse(sparsity=0.5, method="wanda", pattern="2:4"), data=calibration_batches)

Weights are not removed, they are zeroed through mask parametrizations (see masks.py), so the model keeps
its shapes and can be fine-tuned with the zeros held in place; `pk.sparse.bake(model)` (or `bake=True`)
turns the masks into plain zero-filled weights. Data-aware methods run the calibration engine in
prunekit.calibrate block by block.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
import time
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from prunekit.api import PruneResult
from prunekit.batch import (
    POSITIONAL,
    as_batches,
    call_batch,
    eval_mode,
    forward_kwargs,
    forward_parameters,
    model_device,
)
from prunekit.calibrate.layerwise import chain_break, find_blocks, run_layerwise, run_whole
from prunekit.config import register_handler
from prunekit.objective import logits_of
from prunekit.plan import Plan
from prunekit.sparse.algorithms import (
    InputStats,
    magnitude_mask,
    outlier_ratio,
    owl_block_sparsity,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)
from prunekit.sparse.config import Sparse, check_nm_shapes, select_targets
from prunekit.sparse.experts import add_expert_counts, expert_targets, prune_expert_weights
from prunekit.sparse.masks import (
    apply_mask,
    bake,
    layer_input_rows,
    matmul_coverage,
    sparsity_stats,
    stored_weight,
    to_weight_layout,
    weight_2d,
)

log = logging.getLogger("prunekit.sparse")

# ------------------------------------------------------------------------------------------------ pruning

def _prune_layer(module: nn.Module, cfg: Sparse, sparsity: float, stats: Optional[InputStats]) -> None:
    """Choose the mask (and for SparseGPT new weights) of one layer and install it."""
    W = weight_2d(module).detach()                                          # (out, in)
    if cfg.method == "magnitude":
        apply_mask(module, magnitude_mask(W, sparsity, cfg.pattern))
    elif cfg.method == "wanda":
        apply_mask(module, wanda_mask(W, stats.sq_norm.to(W.device), sparsity, cfg.pattern))
    else:
        new_W, keep = sparsegpt_prune(W, stats.H, sparsity, cfg.pattern, cfg.blocksize, cfg.dampening)
        apply_mask(module, keep, new_W)


def _attach_stats(modules: Dict[str, nn.Module], names: List[str], hessian: bool, norms: bool,
                  into: Dict[str, InputStats]) -> List:
    """Forward pre-hooks that feed each named layer's input into an InputStats stored in `into[name]`.

    Layers that read the very same tensor object as the layer hooked just before them (q/k/v reading one
    normalized hidden state, gate/up in a gated MLP) share one InputStats: same statistics, computed once
    (the Hessian accumulation is the expensive part). Identity is checked through a weak reference, so a
    freed tensor whose memory is reused can never be mistaken for the shared one. Returns hook handles."""
    last: List = [None, None]                          # (weakref to last hooked input, its InputStats)
    shared = set()
    handles = []
    for n in names:
        W = weight_2d(modules[n])

        def hook(m, args, kwargs, n=n, cols=W.shape[1], dev=W.device):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            if n in shared:
                return
            st = into.get(n)
            if st is None:                              # first batch: decide whether to share
                prev = last[0]() if last[0] is not None else None
                # convolutions never share: same input and width, yet another stride/padding -> other patches
                if prev is x and last[1].columns == cols and not isinstance(m, nn.modules.conv._ConvNd):
                    into[n] = last[1]
                    shared.add(n)
                    return
                st = into[n] = InputStats(cols, hessian=hessian, norms=norms, device=dev)
            st.add_batch(layer_input_rows(m, x))
            last[0], last[1] = weakref.ref(x), st
        handles.append(modules[n].register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _layout(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "out,in"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "out,in*kernel (convolution, F.unfold order)"
    return "in,out (Conv1D)"


def _group_targets(names: List[str], prefix: Optional[str], n_blocks: int) -> Tuple[Dict[int, List[str]], List[str]]:
    """Split target names into {block index: names} and the rest (outside the block stack)."""
    by_block: Dict[int, List[str]] = {}
    rest = []
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.") if prefix is not None else None
    for n in names:
        hit = pat.match(n) if pat else None
        if hit and int(hit.group(1)) < n_blocks:
            by_block.setdefault(int(hit.group(1)), []).append(n)
        else:
            rest.append(n)
    return by_block, rest


def _owl_ratio(modules, names, stats, m: float) -> float:
    """OWL outlier ratio of one block: share of Wanda scores above m x mean, over all its target layers."""
    scores = torch.cat([wanda_scores(weight_2d(modules[n]).detach(), stats[n].sq_norm).flatten() for n in names])
    return outlier_ratio(scores, m)


@register_handler(Sparse)
def prune_sparse(model: nn.Module, config: Sparse, *, data=None, inplace: bool = False, offload: str = "cpu",
                 offload_dir: Optional[str] = None, device=None) -> PruneResult:
    """Handler behind `pk.prune(model, pk.Sparse(...), data=...)`.

    Context: data (calibration batches; required for wanda/sparsegpt/owl), inplace, offload ('cpu'|'disk':
    where captured activations wait between blocks), offload_dir, device (where each block is processed).
    Everything that can be wrong with the config, the targets or the data is checked before any weight
    (or the copy of the model) changes."""
    cfg = config
    names = select_targets(model, cfg)
    check_nm_shapes(model, names, cfg.pattern)
    batches = as_batches(data, model=model) if cfg.needs_data or data is not None else None
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    t0 = time.perf_counter()
    layer_sparsity = {n: cfg.sparsity for n in names}
    alloc_info = None
    pipeline, prefix, layers = _choose_pipeline(model, cfg)
    notes: List[str] = []
    if pipeline == "layerwise" and prefix is not None and batches and (cfg.needs_data or cfg.allocation != "uniform"):
        broken = chain_break(model, layers, batches[0])
        if broken is not None:                  # block i's output is not block i+1's input: calibrate whole
            pipeline = "whole"
            notes.append(f"calibrated in one whole-model pass, not block by block: '{prefix}' is not a chain "
                         f"({broken})")
            log.warning("Sparse: %s", notes[-1])
    by_block, rest = _group_targets(names, prefix, len(layers) if layers is not None else 0)

    if cfg.allocation != "uniform":
        alloc_info = _allocation_pass(model, modules, cfg, batches, by_block, rest, offload, offload_dir, device,
                                    pipeline if prefix is not None else "whole")
        for key, s in zip(alloc_info["groups"], alloc_info["sparsity"]):
            for n in (by_block[key] if isinstance(key, int) else [key]):
                layer_sparsity[n] = s

    skipped = _prune_targets(model, modules, cfg, names, layer_sparsity, batches, pipeline, (prefix, layers),
                             by_block, rest, offload=offload, offload_dir=offload_dir, device=device)
    # stacked (experts, out, in) weights are parameters, not modules: pruned per expert on its routed tokens
    expert_blocks = expert_targets(model, cfg.targets, cfg.ignore)
    experts = prune_expert_weights(model, expert_blocks, batches, cfg.method, cfg.sparsity, cfg.pattern,
                                   cfg.targets, cfg.ignore) if expert_blocks else {}
    seconds = time.perf_counter() - t0

    measured = add_expert_counts(sparsity_stats(model, names), model, experts)
    plan = Plan(                             # masks are baked into the saved weights; shapes are unchanged
        kind="sparse", config=cfg.to_dict(), blocks=prefix,
        layers={n: {"method": cfg.method, "sparsity": 0.0 if n in skipped else layer_sparsity[n],
                    "pattern": "dense (never ran on calibration data)" if n in skipped else cfg.pattern,
                    "shape": list(weight_2d(modules[n]).shape),
                    "layout": _layout(modules[n])}
                for n in names},
        owl=alloc_info if cfg.allocation == "owl" else None, allocation=alloc_info,
        experts={n: {"method": cfg.method, "sparsity": f} for n, f in experts.items()} if experts else {})
    stats = {"sparsity": measured["layers"], "sparsity_total": measured["total"], "zeros": measured["zeros"],
             "params_targeted": measured["params"], "seconds": seconds, "skipped": skipped,
             "pipeline": pipeline if cfg.needs_data else None}
    if skipped:
        log.warning("Sparse: %d target layers never ran on the calibration data and were left dense: %s",
                    len(skipped), ", ".join(skipped[:5]))
        notes.append(f"{len(skipped)} target layers skipped (left dense): their weights are used outside their "
                     f"own forward, e.g. F.linear(x, layer.weight): {', '.join(skipped[:5])}")
    coverage = matmul_coverage(model, names)
    if coverage < 0.9:
        notes.append(f"the targets hold {coverage:.0%} of the model's matmul parameters (Linear/Conv weights "
                     f"and 3-D expert tensors); the rest stays dense, so the model is less sparse than "
                     f"{cfg.sparsity:.0%}")
    stats.update(warnings=notes, matmul_coverage=coverage)
    if cfg.bake:
        stats["baked"] = bake(model)
    return PruneResult(model=model, plan=plan, config=cfg, stats=stats)



def _prune_targets(model, modules, cfg: Sparse, names, layer_sparsity, batches, pipeline, blocks, by_block, rest, *,
                   offload, offload_dir, device) -> List[str]:
    """Prune every target at its sparsity: magnitude directly, Wanda/SparseGPT from input statistics gathered
    block by block (`pipeline == "layerwise"`) or in one whole-model pass. Returns the targets that never ran
    on the calibration data (left dense)."""
    skipped: List[str] = []
    prefix, layers = blocks
    if cfg.method == "magnitude":
        for n in names:
            _prune_layer(modules[n], cfg, layer_sparsity[n], None)
    else:
        hessian, norms = cfg.method == "sparsegpt", cfg.method == "wanda"
        live: Dict[str, InputStats] = {}

        def observe(group: List[str]):
            return _attach_stats(modules, group, hessian, norms, live)

        def update(group: List[str]):
            for n in group:                                  # pop: each Hessian is freed once used
                st = live.pop(n, None)
                if st is None:                               # the layer never ran on the calibration data
                    skipped.append(n)
                    continue
                _prune_layer(modules[n], cfg, layer_sparsity[n], st)

        if pipeline == "layerwise":
            run_layerwise(model, batches,
                          lambda i, _n, _m: observe(by_block.get(i, [])),
                          lambda i, _n, _m: update(by_block.get(i, [])),
                          sequential=cfg.sequential, offload=offload, offload_dir=offload_dir, device=device,
                          blocks=(prefix, layers), log=log.debug)
            if rest:                     # layers outside the block stack see the already pruned blocks
                run_whole(model, batches, lambda *_: observe(rest), lambda *_: update(rest))
        else:
            run_whole(model, batches, lambda *_: observe(names), lambda *_: update(names))
    return skipped

def _choose_pipeline(model: nn.Module, cfg: Sparse) -> Tuple[str, Optional[str], Optional[nn.ModuleList]]:
    """(pipeline actually used, block-stack prefix or None, the blocks or None). Layer-wise calibration needs
    a stack of repeated blocks; without one the whole model is calibrated in one pass."""
    prefix, layers = None, None
    pipeline = cfg.pipeline
    if cfg.needs_data and pipeline == "layerwise":
        try:
            prefix, layers = find_blocks(model)
        except ValueError:           # no stack of repeated blocks (a CNN, a small MLP): one whole-model pass
            pipeline = "whole"
            log.info("Sparse: %s has no stack of repeated blocks; calibrating it in one whole-model pass",
                     type(model).__name__)
    elif cfg.allocation != "uniform":                         # allocation groups layers by block in either pipeline
        try:
            prefix, layers = find_blocks(model)
        except ValueError:
            pass
    return pipeline, prefix, layers


def _allocation_pass(model, modules, cfg, batches, by_block, rest, offload, offload_dir, device, pipeline) -> dict:
    """Dense pre-pass that scores every group and maps the scores to per-group sparsities (mean = target).

    Groups are transformer blocks (the OWL paper's "layers"). With pipeline='whole' each target outside the
    block stack is a group of its own; with the layer-wise pipeline those keep the uniform target.
    "owl": score = outlier ratio of the group's Wanda scores. "sensitivity": the dense pass only collects Wanda
    input norms; then each group alone is pruned to `sensitivity_sparsity` with Wanda masks and the rise of
    the calibration loss is its score (weights restored bit-exactly after every probe)."""
    scores: Dict[object, object] = {}
    norms: Dict[str, torch.Tensor] = {}
    live: Dict[str, InputStats] = {}

    def observe(group: List[str]):
        return _attach_stats(modules, group, False, True, live)

    def measure(groups: Dict[object, List[str]]):
        for key, group in groups.items():
            group = [n for n in group if n in live]          # layers that ran on the calibration data
            if not group:
                continue
            if cfg.allocation == "owl":
                scores[key] = _owl_ratio(modules, group, live, cfg.owl_m)
            else:
                norms.update({n: live[n].sq_norm.clone() for n in group})
                scores[key] = group
        live.clear()

    if pipeline == "layerwise":                  # nothing changes in this pass, so dense outputs feed forward
        run_layerwise(model, batches, lambda i, _n, _m: observe(by_block.get(i, [])),
                      lambda i, _n, _m: measure({i: by_block.get(i, [])}),
                      sequential=False, offload=offload, offload_dir=offload_dir, device=device,
                      blocks=find_blocks(model))
    else:
        groups = {**by_block, **{n: [n] for n in rest}}
        run_whole(model, batches, lambda *_: observe([n for g in groups.values() for n in g]),
                  lambda *_: measure(groups))
    info: Dict[str, object] = {"method": cfg.allocation, "lambda": cfg.owl_lambda}
    if cfg.allocation == "sensitivity":
        probe = batches[:cfg.sensitivity_batches]
        base, dense_out = _probe_loss(model, probe, None)
        for key in list(scores):
            with _wanda_probe(modules, scores[key], norms, cfg.sensitivity_sparsity):
                scores[key] = _probe_loss(model, probe, dense_out)[0] - base
        info.update(loss_dense=base, probe_sparsity=cfg.sensitivity_sparsity, probe_batches=len(probe))
    keys = list(scores)
    values = [float(scores[k]) for k in keys]
    info.update(groups=keys, score=values, sparsity=owl_block_sparsity(values, cfg.sparsity, cfg.owl_lambda))
    if cfg.allocation == "owl":
        info["outlier_ratio"] = values
    return info


@contextlib.contextmanager
def _wanda_probe(modules: Dict[str, nn.Module], names: List[str], norms: Dict[str, torch.Tensor], sparsity: float):
    """Temporarily zero Wanda's choice of `sparsity` of each named layer's weights; restore them on exit."""
    saved = {}
    try:
        with torch.no_grad():
            for n in names:
                mod, raw = modules[n], stored_weight(modules[n])
                saved[n] = raw.detach().clone()
                keep = wanda_mask(weight_2d(mod).detach(), norms[n].to(raw.device), sparsity)   # (out, in)
                raw.mul_(to_weight_layout(mod, keep).to(raw.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                stored_weight(modules[n]).copy_(w)


@torch.no_grad()
def _probe_loss(model: nn.Module, batches, dense_outputs) -> Tuple[float, list]:
    """Mean calibration loss over `batches`: a language model's own next-token loss (labels = input_ids) when
    its forward takes labels; otherwise the relative squared error of the outputs against `dense_outputs`
    (None: this is the dense run, whose outputs are returned as the reference and whose loss is 0)."""
    device = model_device(model)
    takes_labels = "labels" in (forward_parameters(model) or ())
    total, outs = 0.0, []
    with eval_mode(model):
        for i, b in enumerate(batches):
            if takes_labels and POSITIONAL not in b and "input_ids" in b:
                kw = forward_kwargs(model, b, device)
                kw.setdefault("labels", kw["input_ids"])
                total += float(model(**kw).loss)
                continue
            y = logits_of(call_batch(model, b, device)).float()
            if dense_outputs is None:
                outs.append(y)
            else:
                ref = dense_outputs[i]
                total += float((y - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12))
    return total / len(batches), outs

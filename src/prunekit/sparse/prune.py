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
import dataclasses
import logging
import re
import time
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from prunekit.api import PruneResult
from prunekit.batch import (
    POSITIONAL,
    _eval_mode,
    _forward_kwargs,
    _model_device,
    as_batches,
    call_batch,
    forward_parameters,
)
from prunekit.calibrate.layerwise import chain_break, find_blocks, run_layerwise, run_whole
from prunekit.config import Config, check_type, register_config, register_handler
from prunekit.errors import ConfigError
from prunekit.models.moe import find_moe_blocks
from prunekit.objective import logits_of
from prunekit.sparse.algorithms import (
    InputStats,
    magnitude_mask,
    outlier_ratio,
    owl_block_sparsity,
    parse_pattern,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)
from prunekit.sparse.experts import add_expert_counts, expert_targets, prune_expert_weights
from prunekit.sparse.masks import (
    apply_mask,
    bake,
    is_sparse_target,
    layer_input_rows,
    matmul_coverage,
    sparsity_stats,
    stored_weight,
    to_weight_layout,
    weight_2d,
)

log = logging.getLogger("prunekit.sparse")

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "sensitivity")
PIPELINES = ("layerwise", "whole")
# Default exclusions: the output head and anything embedding-like (their rows are looked up, not summed).
_DEFAULT_IGNORE = (r"(^|\.)lm_head$", r"embed")


@register_config
@dataclasses.dataclass
class Sparse(Config):
    """Zero a fraction of the weights of linear and convolution layers.

    sparsity    fraction of zeros per layer, in [0, 1). For N:M patterns it must equal 1 - N/M.
    method      "magnitude" (|W|, no data), "wanda" (|W| * input norm, per output row) or "sparsegpt"
                (OBS reconstruction of the kept weights from the input Hessian). Wanda/SparseGPT need `data=`.
    pattern     "unstructured" or "N:M" (keep N of every M consecutive input weights, e.g. "2:4").
    targets     regexes (re.search on module names) selecting layers; default: every nn.Linear, Conv1D and
                ungrouped nn.Conv1d/Conv2d (kernels as (out, in*kh*kw) matrices, inputs unfolded into patches;
                N:M groups run along that flattened input) except lm_head, embeddings and weights tied to
                the input embedding. Grouped/depthwise convolutions are not targets.
    ignore      regexes of module names to leave dense.
    allocation  how the overall `sparsity` is spread over blocks (transformer blocks; each layer on its own in
                models without a block stack). Block sparsities span 2 * owl_lambda and average exactly
                `sparsity` (same mapping as OWL):
                  "uniform"      every layer gets `sparsity`;
                  "owl"          outlier-weighted (Yin et al. 2023): blocks whose Wanda scores hold more outliers
                                 (above owl_m x mean) get lower sparsity;
                  "sensitivity"  measured: each block alone is pruned to `sensitivity_sparsity` with Wanda masks
                                 and the rise of the calibration loss (language models: next-token loss; others:
                                 relative output error) over `sensitivity_batches` batches is its sensitivity;
                                 more sensitive blocks get lower sparsity. Weights are restored after each probe.
    owl         shorthand for allocation="owl" (kept for existing recipes).
    dampening   SparseGPT: fraction of the mean Hessian diagonal added to it. blocksize: columns per lazy update.
    sequential  feed each pruned block's outputs to the next block (errors get compensated downstream).
    pipeline    "layerwise" (block by block, low memory) or "whole" (one forward with hooks everywhere,
                statistics of the dense model; needs sequential=False).
    bake        remove the mask parametrizations at the end, leaving plain weights with zeros.
    """
    sparsity: float = 0.5
    method: str = "magnitude"
    pattern: str = "unstructured"
    targets: Optional[List[str]] = None
    ignore: Sequence[str] = ()
    owl: bool = False
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    allocation: str = "uniform"
    sensitivity_sparsity: float = 0.7
    sensitivity_batches: int = 4
    dampening: float = 0.01
    blocksize: int = 128
    sequential: bool = True
    bake: bool = False
    pipeline: str = "layerwise"

    def __post_init__(self):
        o = "Sparse"
        check_type(o, "sparsity", self.sparsity, (int, float), "a number in [0, 1)")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"{o}.sparsity must be in [0, 1) (the fraction of weights set to zero), got {self.sparsity!r}")
        self.sparsity = float(self.sparsity)
        if self.method not in METHODS:
            raise ConfigError(f"{o}.method must be one of {METHODS}, got {self.method!r}")
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as e:
            raise ConfigError(f"{o}.pattern: {e}") from None
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(f"{o}.sparsity={self.sparsity} does not match pattern {self.pattern!r}, which keeps "
                                  f"{nm[0]} of every {nm[1]} weights (sparsity {implied:g}); set sparsity={implied:g}")
            if self.owl or self.allocation != "uniform":
                raise ConfigError(f"{o}.owl / allocation={self.allocation!r} distribute unstructured sparsity across "
                                  f"blocks; they cannot be combined with pattern {self.pattern!r}. Use "
                                  f"pattern='unstructured' or allocation='uniform'")
        for field in ("targets", "ignore"):
            value = getattr(self, field)
            if value is None and field == "targets":
                continue
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{o}.{field} must be a list of regex strings, got {value!r}")
            for rx in value:
                if not isinstance(rx, str):
                    raise ConfigError(f"{o}.{field} must contain regex strings, got {rx!r}")
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ConfigError(f"{o}.{field}: invalid regex {rx!r}: {e}") from None
        if self.targets is not None and not self.targets:
            raise ConfigError(f"{o}.targets is an empty list, so nothing would be pruned; use None for the default")
        for field in ("owl", "sequential", "bake"):
            check_type(o, field, getattr(self, field), bool, "True or False")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"{o}.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.owl and self.allocation not in ("uniform", "owl"):
            raise ConfigError(f"{o}.owl=True asks for allocation='owl' but allocation={self.allocation!r}; set only one")
        if self.owl:
            self.allocation = "owl"
        check_type(o, "sensitivity_sparsity", self.sensitivity_sparsity, (int, float), "a number in (0, 1)")
        if not 0.0 < self.sensitivity_sparsity < 1.0:
            raise ConfigError(f"{o}.sensitivity_sparsity must be in (0, 1), got {self.sensitivity_sparsity!r}")
        check_type(o, "sensitivity_batches", self.sensitivity_batches, int, "a positive int")
        if self.sensitivity_batches < 1:
            raise ConfigError(f"{o}.sensitivity_batches must be >= 1, got {self.sensitivity_batches!r}")
        check_type(o, "owl_lambda", self.owl_lambda, (int, float), "a number")
        check_type(o, "owl_m", self.owl_m, (int, float), "a number")
        check_type(o, "dampening", self.dampening, (int, float), "a number")
        check_type(o, "blocksize", self.blocksize, int, "a positive int")
        if self.allocation != "uniform" and not (0.0 <= 2 * self.owl_lambda <= self.sparsity
                                                 and self.sparsity + 2 * self.owl_lambda < 1):
            # block sparsities span 2*lambda around the mean, so each may sit up to 2*lambda from it
            raise ConfigError(f"{o}.owl_lambda={self.owl_lambda} could push a block's sparsity outside [0, 1): "
                              f"need 0 <= 2*owl_lambda <= sparsity ({self.sparsity}) and sparsity + 2*owl_lambda < 1")
        if self.owl_m <= 0:
            raise ConfigError(f"{o}.owl_m must be > 0 (outliers are scores above owl_m x mean), got {self.owl_m!r}")
        if self.dampening < 0:
            raise ConfigError(f"{o}.dampening must be >= 0, got {self.dampening!r}")
        if self.blocksize < 1:
            raise ConfigError(f"{o}.blocksize must be >= 1, got {self.blocksize!r}")
        if self.pipeline not in PIPELINES:
            raise ConfigError(f"{o}.pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if self.pipeline == "whole" and self.sequential:
            raise ConfigError(f"{o}.pipeline='whole' collects all statistics from the dense model in one pass, so it "
                              f"cannot feed pruned outputs forward; set sequential=False or pipeline='layerwise'")
        if self.ignore is not None:
            self.ignore = list(self.ignore)

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude" or self.allocation != "uniform"


# ------------------------------------------------------------------------------------------------ targets

def select_targets(model: nn.Module, cfg: Sparse) -> List[str]:
    """Names of the linear/conv layers `cfg` prunes, in module order. Raises ConfigError if a `targets` regex
    matches no such layer or nothing is left to prune."""
    linear = [(n, m) for n, m in model.named_modules() if n and is_sparse_target(m)]
    # layers sharing their weight with an embedding table (tied LM heads) stay dense; found without
    # get_input_embeddings, which multi-tower and vision models do not implement
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = {n for n, m in linear if id(m.weight) in tables}
    if cfg.targets is None:
        chosen = [n for n, _ in linear if n not in tied and not any(re.search(rx, n) for rx in _DEFAULT_IGNORE)]
    else:
        chosen = []
        stacked = [w.name for b in find_moe_blocks(model) for w in b.weights]     # 3-D expert weights
        for rx in cfg.targets:
            if not any(re.search(rx, n) for n, _ in linear) and not any(re.search(rx, n) for n in stacked):
                sample = ", ".join(n for n, _ in linear[:4])
                raise ConfigError(f"Sparse.targets: regex {rx!r} matches no linear or ungrouped conv layer of "
                                  f"{type(model).__name__} (they look like: {sample})")
        chosen = [n for n, _ in linear if any(re.search(rx, n) for rx in cfg.targets)]
    chosen = [n for n in chosen if not any(re.search(rx, n) for rx in cfg.ignore)]
    if not chosen and not expert_targets(model, cfg.targets, cfg.ignore):
        raise ConfigError(f"Sparse: no linear/conv layer of {type(model).__name__} is left to prune after targets="
                          f"{cfg.targets!r} and ignore={list(cfg.ignore)!r}")
    return chosen


def _check_nm_shapes(model: nn.Module, names: List[str], pattern: str) -> None:
    nm = parse_pattern(pattern)
    if nm is None:
        return
    modules = dict(model.named_modules())
    bad = [f"{n} (in_features={weight_2d(modules[n]).shape[1]})" for n in names
           if weight_2d(modules[n]).shape[1] % nm[1]]
    if bad:
        raise ConfigError(f"Sparse.pattern={pattern!r} groups input weights by {nm[1]}, but these layers' input size is "
                          f"not divisible by {nm[1]}: {', '.join(bad[:5])}; add them to ignore=[...]")


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
                 offload_dir: Optional[str] = None, device=None, **ignored) -> PruneResult:
    """Handler behind `pk.prune(model, pk.Sparse(...), data=...)`.

    Context: data (calibration batches; required for wanda/sparsegpt/owl), inplace, offload ('cpu'|'disk':
    where captured activations wait between blocks), offload_dir, device (where each block is processed).
    Everything that can be wrong with the config, the targets or the data is checked before any weight
    (or the copy of the model) changes."""
    cfg = config
    names = select_targets(model, cfg)
    _check_nm_shapes(model, names, cfg.pattern)
    batches = as_batches(data, model=model) if cfg.needs_data or data is not None else None
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    t0 = time.perf_counter()
    layer_sparsity = {n: cfg.sparsity for n in names}
    skipped: List[str] = []
    alloc_info = None
    prefix, n_blocks = None, 0

    pipeline = cfg.pipeline
    if cfg.needs_data and pipeline == "layerwise":
        try:
            prefix, layers = find_blocks(model)
            n_blocks = len(layers)
        except ValueError:           # no stack of repeated blocks (a CNN, a small MLP): one whole-model pass
            pipeline = "whole"
            log.info("Sparse: %s has no stack of repeated blocks; calibrating it in one whole-model pass",
                     type(model).__name__)
    elif cfg.allocation != "uniform":                         # allocation groups layers by block in either pipeline
        try:
            prefix, layers = find_blocks(model)
            n_blocks = len(layers)
        except ValueError:
            pass
    notes: List[str] = []
    if pipeline == "layerwise" and prefix is not None and batches and (cfg.needs_data or cfg.allocation != "uniform"):
        broken = chain_break(model, layers, batches[0])
        if broken is not None:                  # block i's output is not block i+1's input: calibrate whole
            pipeline = "whole"
            notes.append(f"calibrated in one whole-model pass, not block by block: '{prefix}' is not a chain "
                         f"({broken})")
            log.warning("Sparse: %s", notes[-1])
    by_block, rest = _group_targets(names, prefix, n_blocks)

    if cfg.allocation != "uniform":
        alloc_info = _allocation_pass(model, modules, cfg, batches, by_block, rest, offload, offload_dir, device,
                                    pipeline if prefix is not None else "whole")
        for key, s in zip(alloc_info["groups"], alloc_info["sparsity"]):
            for n in (by_block[key] if isinstance(key, int) else [key]):
                layer_sparsity[n] = s

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
    # stacked (experts, out, in) weights are parameters, not modules: pruned per expert on its routed tokens
    expert_blocks = expert_targets(model, cfg.targets, cfg.ignore)
    experts = prune_expert_weights(model, expert_blocks, batches, cfg.method, cfg.sparsity, cfg.pattern,
                                   cfg.targets, cfg.ignore) if expert_blocks else {}
    seconds = time.perf_counter() - t0

    measured = add_expert_counts(sparsity_stats(model, names), model, experts)
    plan = {
        "format": "prunekit.sparse/1",     # masks are baked into the saved weights; shapes are unchanged
        "type": "Sparse",
        "config": cfg.to_dict(),
        "blocks": prefix,
        "layers": {n: {"method": cfg.method, "sparsity": 0.0 if n in skipped else layer_sparsity[n],
                       "pattern": "dense (never ran on calibration data)" if n in skipped else cfg.pattern,
                       "shape": list(weight_2d(modules[n]).shape),
                       "layout": _layout(modules[n])}
                   for n in names},
        "owl": alloc_info if cfg.allocation == "owl" else None,
        "allocation": alloc_info,
        **({"experts": {n: {"method": cfg.method, "sparsity": f} for n, f in experts.items()}} if experts else {}),
    }
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
    device = _model_device(model)
    takes_labels = "labels" in (forward_parameters(model) or ())
    total, outs = 0.0, []
    with _eval_mode(model):
        for i, b in enumerate(batches):
            if takes_labels and POSITIONAL not in b and "input_ids" in b:
                kw = _forward_kwargs(model, b, device)
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

"""Depth pruning: remove whole transformer blocks.

Scores (higher = more important, the lowest-scoring `n` blocks go):
  block_influence  ShortGPT's BI: 1 - mean cosine(h_in, h_out) of a block over calibration tokens. A block that
                   barely rotates the residual stream changes little when removed.
  angular          Gromov et al.: angular distance between the input of block l and the output of block l+n-1;
                   the contiguous run of n blocks with the smallest distance goes.
  greedy_loss      remove, n times, the block whose removal raises the calibration loss least (exact, slower).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from prunekit.api import PruneResult
from prunekit.batch import as_batches, call_batch, eval_mode, model_device
from prunekit.calibrate.layerwise import find_blocks, hidden_input, hidden_output
from prunekit.config import Config, register_config, register_handler
from prunekit.errors import ConfigError
from prunekit.measure.counts import count_params
from prunekit.models.hf import config_valid, is_hf
from prunekit.plan import Plan, plan_of

IMPORTANCES = ("block_influence", "angular", "greedy_loss")


@register_config
@dataclasses.dataclass
class Layers(Config):
    """Remove `n` whole blocks (transformer layers) chosen by `importance` on calibration `data`."""
    n: int = 1
    importance: str = "block_influence"

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ConfigError(f"Layers.n must be an int >= 0, got {self.n!r}")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"Layers.importance must be one of {IMPORTANCES}, got {self.importance!r}")


# ------------------------------------------------------------------------------------------- which blocks

def _containers_under(root: nn.Module, prefix: str) -> List[Tuple[str, nn.Module]]:
    """Block containers (ModuleList / Sequential of same-class modules with parameters) strictly inside `root`,
    outermost only: the per-stage block lists of a hierarchical model (HF Swin `layers.i.blocks`, ConvNeXt /
    ResNet `stages.i.layers`, SegFormer `block.i`)."""
    out: List[Tuple[str, nn.Module]] = []
    for name, mod in root.named_modules():
        if not name or not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) == 0:
            continue
        if len({type(c) for c in mod}) != 1 or next(mod.parameters(), None) is None:
            continue
        if not any(name.startswith(n + ".") for n, _ in out):
            out.append((name, mod))
    return [(f"{prefix}.{n}" if prefix else n, m) for n, m in out]


def _shape_keeping(model: nn.Module, containers, batch) -> Dict[int, bool]:
    """id(block) -> True when the block ran and every call returned hidden states shaped like its input (so
    the model still runs without it)."""
    seen: Dict[int, bool] = {}
    stash: Dict[int, Optional[torch.Size]] = {}

    def pre(mod, args, kwargs):
        h = hidden_input(tuple(args), dict(kwargs))
        stash[id(mod)] = None if h is None else h.shape

    def post(mod, _args, _kwargs, out):
        h = hidden_output(out)
        same = h is not None and stash.get(id(mod)) == h.shape
        seen[id(mod)] = seen.get(id(mod), True) and same

    hooks = []
    for _, c in containers:
        for b in c:
            hooks += [b.register_forward_pre_hook(pre, with_kwargs=True),
                      b.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            call_batch(model, batch, model_device(model))
    finally:
        for h in hooks:
            h.remove()
    return seen


def removable_blocks(model: nn.Module, batch) -> Tuple[str, List[Tuple[str, nn.Module, int]], bool]:
    """(stack path, [(container path, container, index)], whether they are the whole stack): the blocks depth
    pruning may remove.

    The stack is `find_blocks`' list. When every block of it keeps its input shape (transformer layers) it is
    the only container. Otherwise (stages that downsample or widen) the blocks inside its stages that keep
    their input shape are the candidates, so depth pruning works within a stage. A model without a ModuleList
    stack (torchvision / timm CNNs) offers the shape-keeping blocks of its Sequential runs of same-class blocks
    (ResNet `layer1..4`). With none, a ConfigError."""
    try:
        path, stack = find_blocks(model)
    except ConfigError:
        path, stack = "", None
    inner = _containers_under(stack, path) if stack is not None else _containers_under(model, "")
    keeps = _shape_keeping(model, ([(path, stack)] if stack is not None else []) + inner, batch)
    if stack is not None and all(keeps.get(id(b), False) for b in stack):
        return path, [(path, stack, i) for i in range(len(stack))], True
    found = [(p, c, i) for p, c in inner for i, b in enumerate(c) if keeps.get(id(b), False)]
    if not found and stack is not None:
        found = [(path, stack, i) for i, b in enumerate(stack) if keeps.get(id(b), False)]
    if not found:
        where = f"of '{path}' ({type(stack[0]).__name__}) or of the block lists inside it" if stack is not None \
            else "in a ModuleList or Sequential of same-class blocks"
        raise ConfigError(f"Layers: no block {where} returns hidden states shaped like its input, so removing "
                          f"one would break {type(model).__name__}; use pk.Structured to make it smaller")
    return path, found, False


# -------------------------------------------------------------------------------------------- scores

def _tokens(h: torch.Tensor) -> torch.Tensor:
    """(tokens, channels): (B, T, C) sequences as they are, (B, C, H, W) feature maps channel-last."""
    h = h.detach().float()
    if h.dim() == 4:
        h = h.movedim(1, -1)
    return h.reshape(-1, h.shape[-1]) if h.dim() > 1 else h.reshape(1, -1)


def _block_io(model, cands, batches, keep_io: bool):
    """Per candidate block: BI (1 - mean cosine of its input and output tokens) and, with keep_io, the
    input and output tokens themselves (for the angular distance over runs of blocks)."""
    sums = [0.0] * len(cands)
    counts = [0] * len(cands)
    ins: List[List[torch.Tensor]] = [[] for _ in cands]
    outs: List[List[torch.Tensor]] = [[] for _ in cands]
    stash: Dict[int, torch.Tensor] = {}

    def pre(k):
        def f(mod, args, kwargs):
            stash[k] = _tokens(hidden_input(tuple(args), dict(kwargs)))
        return f

    def post(k):
        def f(mod, args, kwargs, out):
            a, b = stash.pop(k), _tokens(hidden_output(out))
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            sums[k] += float(cos.sum())
            counts[k] += cos.numel()
            if keep_io:
                ins[k].append(a)
                outs[k].append(b)
        return f

    hooks = []
    for k, (_, c, i) in enumerate(cands):
        hooks += [c[i].register_forward_pre_hook(pre(k), with_kwargs=True),
                  c[i].register_forward_hook(post(k), with_kwargs=True)]
    try:
        with torch.no_grad():
            for batch in batches:
                call_batch(model, batch, model_device(model))
    finally:
        for h in hooks:
            h.remove()
    bi = torch.tensor([1 - s / max(n, 1) for s, n in zip(sums, counts)])
    return bi, [torch.cat(x) if x else None for x in ins], [torch.cat(x) if x else None for x in outs]


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of arccos(cos(a, b)) / pi."""
    c = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
    return float((torch.arccos(c) / math.pi).mean())


def _lm_loss(model, batches) -> float:
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for b in batches:
            if "input_ids" not in b:
                raise ConfigError("Layers(importance='greedy_loss') needs a language model and token batches "
                                  "(input_ids) to compute its loss; use importance='block_influence'")
            out = model(**b, labels=b["input_ids"])
            tot += float(out.loss) * b["input_ids"].numel()
            cnt += b["input_ids"].numel()
    return tot / max(cnt, 1)


def _runs(cands, n: int) -> List[List[int]]:
    """Runs of n consecutive candidates in the same container (the angular criterion removes a run)."""
    return [list(range(k, k + n)) for k in range(len(cands) - n + 1)
            if all(cands[k + j][0] == cands[k][0] and cands[k + j][2] == cands[k][2] + j for j in range(n))]


def choose_blocks(model, cfg: Layers, batches) -> Tuple[str, List[Tuple[str, nn.Module, int]], List[int]]:
    """(stack path, candidates, indices into candidates of the blocks to remove)."""
    path, cands, whole_stack = removable_blocks(model, batches[0])
    if cfg.n > len(cands) or (whole_stack and cfg.n == len(cands)):
        most = len(cands) - 1 if whole_stack else len(cands)
        raise ConfigError(f"Layers.n={cfg.n} would remove {'all ' if whole_stack else 'more than the '}"
                          f"{len(cands)} blocks of '{path}' that can be removed; use n <= {most}")
    if cfg.n == 0:
        return path, cands, []
    if cfg.importance == "block_influence":
        bi, _, _ = _block_io(model, cands, batches, keep_io=False)
        return path, cands, sorted(torch.argsort(bi, stable=True)[:cfg.n].tolist())
    if cfg.importance == "angular":
        runs = _runs(cands, cfg.n)
        if not runs:
            raise ConfigError(f"Layers(n={cfg.n}, importance='angular') needs {cfg.n} consecutive removable "
                              f"blocks in one block list of '{path}'; use a smaller n or "
                              f"importance='block_influence'")
        _, ins, outs = _block_io(model, cands, batches, keep_io=True)
        return path, cands, min(runs, key=lambda r: angular_distance(ins[r[0]], outs[r[-1]]))
    removed: List[int] = []          # greedy_loss
    for _ in range(cfg.n):
        best, best_loss = None, float("inf")
        for k in range(len(cands)):
            if k in removed:
                continue
            trial = copy.deepcopy(model)
            drop_blocks(trial, [_name(cands[j]) for j in removed + [k]])
            loss = _lm_loss(trial, batches)
            if loss < best_loss:
                best, best_loss = k, loss
        removed.append(best)
    return path, cands, sorted(removed)


def _name(cand) -> str:
    return f"{cand[0]}.{cand[2]}" if cand[0] else str(cand[2])


# ------------------------------------------------------------------------------------------- removal

def drop_blocks(model: nn.Module, names: Sequence[str]) -> bool:
    """Delete the named blocks (`<container path>.<index>`) in place, renumber `layer_idx` (KV cache slots)
    and update the config. Returns True when the config still describes the model exactly."""
    try:
        path, stack = find_blocks(model)
        inner = _containers_under(stack, path)
    except ConfigError:                 # a CNN without a block stack: no config field counts its blocks
        path, stack, inner = None, None, []
    lengths = {p: len(c) for p, c in ([(path, stack)] if stack is not None else []) + inner}
    by_container: Dict[str, set] = {}
    for n in names:
        p, _, i = n.rpartition(".")
        by_container.setdefault(p, set()).add(int(i))
    for p, idx in by_container.items():
        container = model.get_submodule(p)
        keep = [b for i, b in enumerate(container) if i not in idx]
        parent = model.get_submodule(p.rpartition(".")[0]) if "." in p else model
        setattr(parent, p.rpartition(".")[2], nn.Sequential(*keep) if isinstance(container, nn.Sequential)
                else nn.ModuleList(keep))
        for new_i, b in enumerate(keep):
            for m in b.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new_i
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    if path is not None and set(by_container) <= {path}:
        _update_layer_count(cfg, lengths[path], sorted(by_container.get(path, ())))
        return config_valid(cfg, model)
    return _update_depths(model, cfg, [p for p, _ in inner], lengths, by_container)


def _update_layer_count(cfg, before: int, remove: Sequence[int]) -> None:
    for f in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, f, None), int):
            setattr(cfg, f, before - len(remove))
            break
    lt = getattr(cfg, "layer_types", None)
    if isinstance(lt, list) and len(lt) == before:
        cfg.layer_types = [t for i, t in enumerate(lt) if i not in set(remove)]


def _update_depths(model, cfg, stages: List[str], lengths, by_container) -> bool:
    """Hierarchical configs list blocks per stage (`depths`); rewrite it when it matches the stage lists and
    the rewritten config builds exactly the pruned shapes (else the config is left as it was)."""
    old = getattr(cfg, "depths", None)
    if not isinstance(old, (list, tuple)) or list(old) != [lengths[p] for p in stages]:
        return False
    cfg.depths = [lengths[p] - len(by_container.get(p, ())) for p in stages]
    if is_hf(model) and config_valid(cfg, model):
        return True
    cfg.depths = old
    return False


def replay_layers(model: nn.Module, plan: Plan) -> nn.Module:
    if plan.removed_blocks:
        drop_blocks(model, plan.removed_blocks)
    else:
        drop_blocks(model, [f"{plan.blocks}.{i}" if plan.blocks else str(i) for i in plan.removed_layers])
    return model


_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "depths")


def _base_config(model: nn.Module) -> Optional[dict]:
    """The config a depth plan records as its base. Normally the model's own; but a width prune can leave a
    config transformers refuses to build (Llama with hidden 448 and 6 heads of 64: 'hidden size is not a multiple
    of the number of attention heads'), and then the architecture that width prune started from is recorded
    instead -- pk.load takes every width from the tensors after dropping the blocks -- provided it has the same
    depth (its layer indices are this plan's)."""
    if not hasattr(model, "config"):
        return None
    own = model.config.to_dict()
    earlier = plan_of(model)
    if not is_hf(model) or config_valid(model.config) or earlier is None or earlier.kind != "structured" \
            or not earlier.hf_base_config:
        return own
    root = earlier.hf_base_config
    if any(root.get(k) != own.get(k) for k in _DEPTH_KEYS):
        return own
    return root


@register_handler(Layers)
def prune_layers(model: nn.Module, cfg: Layers, *, data=None, inplace: bool = False) -> PruneResult:
    if data is None:
        raise ConfigError("prune(model, Layers(...)) needs data=: calibration batches (input_ids tensors of shape "
                          "(B, T) or dicts of forward keyword arguments)")
    batches = as_batches(data, what="Layers data", model=model)
    with eval_mode(model):
        path, cands, remove = choose_blocks(model, cfg, batches)
    names = [_name(cands[k]) for k in remove]
    params_before = count_params(model)
    base_config = _base_config(model)
    out = model if inplace else copy.deepcopy(model)
    exact = drop_blocks(out, names)
    single = all(cands[k][0] == path for k in remove)
    plan = Plan(kind="layers", config=cfg.to_dict(), blocks=path,
                removed_layers=[cands[k][2] for k in remove] if single else [],
                removed_blocks=[] if single else names)
    if base_config is not None:
        plan.hf_base_config, plan.hf_class, plan.hf_config_exact = base_config, type(model).__name__, exact
    return PruneResult(model=out, plan=plan, config=cfg,
                       stats={"params_before": params_before, "params_after": count_params(out),
                              "removed_layers": plan.removed_layers, "removed_blocks": names})

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
from typing import List, Sequence

import torch
import torch.nn as nn

from prunekit.api import PruneResult
from prunekit.batch import as_batches, eval_mode
from prunekit.calibrate.layerwise import find_blocks
from prunekit.config import Config, register_config, register_handler
from prunekit.errors import ConfigError
from prunekit.measure.counts import count_params
from prunekit.plan import Plan

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


def _blocks(model: nn.Module):
    return find_blocks(model)


def _batches(data):
    return as_batches(data, what="Layers data")


def _block_io(model, batches) -> List[List[torch.Tensor]]:
    """Hidden states entering every block and leaving the last: hs[l] (l = 0..L), each (tokens, hidden)."""
    path, blocks = _blocks(model)
    hs: List[List[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
    hooks = []

    def pre(i):
        def f(mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            hs[i].append(h.detach().reshape(-1, h.shape[-1]).float())
        return f

    def post(mod, args, kwargs, out):
        h = out[0] if isinstance(out, (tuple, list)) else out
        hs[-1].append(h.detach().reshape(-1, h.shape[-1]).float())

    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
    hooks.append(blocks[-1].register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x) for x in hs]


def block_influence(hs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(L,) BI of each block: 1 - mean cosine similarity between its input and output tokens."""
    return torch.stack([1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean()
                        for i in range(len(hs) - 1)])


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of arccos(cos(a, b)) / pi."""
    c = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
    return float((torch.arccos(c) / math.pi).mean())


def _lm_loss(model, batches) -> float:
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for b in batches:
            out = model(**b, labels=b["input_ids"])
            tot += float(out.loss) * b["input_ids"].numel()
            cnt += b["input_ids"].numel()
    return tot / max(cnt, 1)


def choose_layers(model, cfg: Layers, batches) -> List[int]:
    path, blocks = _blocks(model)
    L = len(blocks)
    if cfg.n >= L:
        raise ConfigError(f"Layers.n={cfg.n} would remove all {L} blocks of '{path}'; use n <= {L - 1}")
    if cfg.n == 0:
        return []
    if cfg.importance == "block_influence":
        bi = block_influence(_block_io(model, batches))
        return sorted(torch.argsort(bi)[:cfg.n].tolist())
    if cfg.importance == "angular":
        hs = _block_io(model, batches)
        d = [angular_distance(hs[l], hs[l + cfg.n]) for l in range(L - cfg.n + 1)]
        start = min(range(len(d)), key=d.__getitem__)
        return list(range(start, start + cfg.n))
    removed: List[int] = []          # greedy_loss
    for _ in range(cfg.n):
        best, best_loss = None, float("inf")
        for i in range(L):
            if i in removed:
                continue
            trial = copy.deepcopy(model)
            drop_layers(trial, removed + [i])
            loss = _lm_loss(trial, batches)
            if loss < best_loss:
                best, best_loss = i, loss
        removed.append(best)
    return sorted(removed)


def drop_layers(model: nn.Module, remove: Sequence[int]) -> nn.Module:
    """Delete blocks in place, renumber `layer_idx` (KV cache slots) and update the config."""
    path, blocks = _blocks(model)
    remove = set(remove)
    keep = [b for i, b in enumerate(blocks) if i not in remove]
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], nn.ModuleList(keep))
    for new_i, b in enumerate(keep):
        for m in b.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_i
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for f in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(cfg, f, None), int):
                setattr(cfg, f, len(keep))
                break
        lt = getattr(cfg, "layer_types", None)
        if isinstance(lt, list) and len(lt) == len(blocks):
            cfg.layer_types = [t for i, t in enumerate(lt) if i not in remove]
    return model


def replay_layers(model: nn.Module, plan: Plan) -> nn.Module:
    return drop_layers(model, plan.removed_layers)


@register_handler(Layers)
def prune_layers(model: nn.Module, cfg: Layers, *, data=None, inplace: bool = False) -> PruneResult:
    if data is None:
        raise ConfigError("prune(model, Layers(...)) needs data=: calibration batches (input_ids tensors of shape "
                          "(B, T) or dicts of forward keyword arguments)")
    batches = _batches(data)
    with eval_mode(model):
        remove = choose_layers(model, cfg, batches)
    params_before = count_params(model)
    base_config = model.config.to_dict() if hasattr(model, "config") else None
    out = model if inplace else copy.deepcopy(model)
    drop_layers(out, remove)
    path, _ = _blocks(out)
    plan = Plan(kind="layers", config=cfg.to_dict(), blocks=path, removed_layers=list(remove))
    if base_config is not None:
        plan.hf_base_config, plan.hf_class, plan.hf_config_exact = base_config, type(model).__name__, True
    return PruneResult(model=out, plan=plan, config=cfg,
                       stats={"params_before": params_before, "params_after": count_params(out),
                              "removed_layers": remove})

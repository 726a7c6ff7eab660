"""Hugging Face adapters: what the graph cannot see in a transformer.

The dependency graph finds which slices go together (heads with their q/k/v rows and o_proj columns, GQA
groups, FFN neurons, the residual stream). What it cannot know is where a family *stores* sizes: the config
(`num_attention_heads`, `intermediate_size`, ...) and attention attributes (`num_heads`, `split_size`, ...).
This module keeps that knowledge in one table of name patterns instead of a driver per architecture.

Saved layout (pk.save on a PreTrainedModel):
    config.json, model.safetensors   a normal HF directory: `AutoModelFor...from_pretrained(dir)` works when
                                     the pruned shapes are expressible by the config (checked when saving)
    prunekit_base_config.json        the original config, for `pk.load(dir)` when they are not (per-layer widths)
    plan.json, prunekit.json         what was cut, and checksums
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

# name patterns of the projections that reveal the sizes the config stores
Q_NAMES = ("q_proj", "query", "q", "c_attn", "qkv_proj", "Wqkv")
K_NAMES = ("k_proj", "key", "k")
FFN_IN_NAMES = ("up_proj", "fc1", "c_fc", "intermediate.dense", "fc_in", "w1", "dense_h_to_4h", "gate_up_proj")
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")


def is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _out_features(m: nn.Module) -> Optional[int]:
    if isinstance(m, nn.Linear):
        return m.out_features
    if type(m).__name__ == "Conv1D":           # GPT-2 stores Linear transposed
        return m.weight.shape[1]
    return None


def head_dim_of(config) -> int:
    hd = getattr(config, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    return config.hidden_size // config.num_attention_heads


def attention_modules(model: nn.Module):
    """(name, module, q projection, k projection or None) for every attention block."""
    out = []
    for name, mod in model.named_modules():
        q = k = None
        for qn in Q_NAMES:
            c = getattr(mod, qn, None)
            if isinstance(c, nn.Module) and _out_features(c):
                q = (qn, c)
                break
        if q is None:
            continue
        for kn in K_NAMES:
            c = getattr(mod, kn, None)
            if isinstance(c, nn.Module) and _out_features(c) and c is not q[1]:
                k = c
                break
        out.append((name, mod, q, k))
    return out


def layer_sizes(model: nn.Module, base_config) -> Dict[str, List[int]]:
    """Per-layer heads, kv heads and FFN widths read from the weights."""
    hd = head_dim_of(base_config)
    heads, kv = [], []
    for name, mod, (qn, q), k in attention_modules(model):
        n = _out_features(q)
        if qn in ("c_attn", "qkv_proj", "Wqkv") and k is None:
            if getattr(base_config, "num_key_value_heads", None) not in (None, base_config.num_attention_heads):
                continue      # fused GQA projection: sizes come from the split attributes
            n //= 3
        heads.append(n // hd)
        if k is not None:
            kv.append(_out_features(k) // hd)
    ffn = []
    for name, mod in model.named_modules():
        if any(name.endswith(f) for f in FFN_IN_NAMES):
            f = _out_features(mod)
            if f:
                ffn.append(f // 2 if name.endswith("gate_up_proj") else f)
    return {"heads": heads, "kv_heads": kv, "ffn": ffn}


def fix_attention_attrs(model: nn.Module, base_config) -> None:
    """Make attention modules' size attributes agree with their pruned projections."""
    hd = head_dim_of(base_config)
    for name, mod, (qn, q), k in attention_modules(model):
        width = _out_features(q)
        if qn in ("c_attn",):
            width //= 3
        h = width // hd
        kvh = _out_features(k) // hd if k is not None else None
        for a in HEAD_ATTRS:
            if isinstance(getattr(mod, a, None), int):
                setattr(mod, a, h)
        for a in WIDTH_ATTRS:
            if isinstance(getattr(mod, a, None), int):
                setattr(mod, a, width)
        if kvh is not None:
            for a in KV_ATTRS:
                if isinstance(getattr(mod, a, None), int):
                    setattr(mod, a, kvh)
            if isinstance(getattr(mod, "num_key_value_groups", None), int) and kvh:
                mod.num_key_value_groups = max(1, h // kvh)


def pruned_config(model: nn.Module, base_config):
    """The base config with the pruned sizes when they are uniform across layers; else None."""
    cfg = base_config.__class__.from_dict(base_config.to_dict())
    sizes = layer_sizes(model, base_config)
    hidden = _embedding_width(model)
    if hidden is not None and hidden != base_config.hidden_size:
        cfg.hidden_size = hidden
    if sizes["heads"]:
        if len(set(sizes["heads"])) != 1:
            return None
        cfg.num_attention_heads = sizes["heads"][0]
    if sizes["kv_heads"] and hasattr(cfg, "num_key_value_heads") and cfg.num_key_value_heads is not None:
        if len(set(sizes["kv_heads"])) != 1:
            return None
        cfg.num_key_value_heads = sizes["kv_heads"][0]
    # keep head_dim explicit: families that read `config.head_dim` then keep it when heads change
    cfg.head_dim = head_dim_of(base_config)
    if sizes["ffn"]:
        if len(set(sizes["ffn"])) != 1:
            return None
        for f in ("intermediate_size", "ffn_dim", "n_inner"):
            if f in cfg.to_dict() or hasattr(cfg, f):
                setattr(cfg, f, sizes["ffn"][0])
                break
    return cfg


def _shapes_match(model: nn.Module, cfg) -> bool:
    """Would `type(model)(cfg)` have exactly the pruned model's parameter shapes? (built on the meta device)"""
    try:
        with torch.device("meta"):
            probe = type(model)(cfg)
    except Exception:
        return False
    a = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return a == b


def config_expresses(model: nn.Module, cfg) -> bool:
    """True if `from_pretrained` with `cfg` rebuilds exactly the model's parameter shapes."""
    return _shapes_match(model, cfg)


def after_surgery(model: nn.Module, base_config) -> bool:
    """Update attention attributes and `model.config`. Returns True if the config expresses the new shapes."""
    fix_attention_attrs(model, base_config)
    cfg = pruned_config(model, base_config)
    if cfg is not None and _shapes_match(model, cfg):
        model.config = cfg
        for m in model.modules():                 # sub-modules holding the config object see the new one
            if hasattr(m, "config") and m is not model and getattr(m, "config") is base_config:
                m.config = cfg
        return True
    return False


def _embedding_param(model: nn.Module):
    """(weight, dim holding the hidden size) of the input embeddings: token table or patch projection."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return None, None
    if isinstance(emb, nn.Embedding):
        return emb.weight, 1
    for p in emb.parameters():
        if p.dim() >= 2:
            return p, 0         # conv/linear patch embedding: output channels
    return None, None


def _embedding_width(model: nn.Module) -> Optional[int]:
    w, d = _embedding_param(model)
    return None if w is None else w.shape[d]


def hidden_group_indices(graph, model: nn.Module) -> List[int]:
    """Groups that carry the residual stream (the input embeddings' width)."""
    w, d = _embedding_param(model)
    if w is None:
        return []
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is w}
    return [g.index for g in graph.groups if any(m.name in names and m.dim == d for m in g.members)]

"""Hugging Face adapters: what the graph cannot see in a transformer.

The dependency graph finds which slices go together (heads with their q/k/v rows and o_proj columns, GQA
groups, FFN neurons, the residual stream). What it cannot know is where a family *stores* sizes: the config
(`num_attention_heads`, `intermediate_size`, ...) and attention attributes (`num_heads`, `split_size`, ...).
This module keeps that knowledge in tables of name patterns instead of a driver per architecture.

Nothing here assumes a text transformer: a model may have no `get_input_embeddings` (CNNs, CLIP), several
towers with their own sub-config (CLIP's `text_config`/`vision_config`: every module is read against the
config its nearest ancestor holds), sizes stored as per-stage lists (Swin's `num_heads`) or derived by a
read-only property (Falcon's `head_dim`: never set, the check below decides whether the config expresses the
result). Whether `from_pretrained` can rebuild the pruned shapes is decided by building the rewritten config
on the meta device and comparing every parameter shape, never by a list of families.

Saved layout (pk.save on a PreTrainedModel):
    config.json, model.safetensors   a normal HF directory: `AutoModelFor...from_pretrained(dir)` works when
                                     the pruned shapes are expressible by the config (checked when saving)
    prunekit_base_config.json        the original config, for `pk.load(dir)` when they are not (per-layer widths)
    plan.json, prunekit.json         what was cut, and checksums
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from prunekit.models import moe

# name patterns of the projections that reveal the sizes the config stores
Q_NAMES = ("q_proj", "query", "q", "query_proj", "q_lin", "c_attn", "qkv_proj", "Wqkv", "query_key_value", "qkv")
K_NAMES = ("k_proj", "key", "k", "key_proj", "k_lin")
FUSED_QKV = ("c_attn", "qkv_proj", "Wqkv", "query_key_value", "qkv")
FFN_IN_NAMES = ("up_proj", "fc1", "c_fc", "intermediate.dense", "fc_in", "w1", "dense_h_to_4h", "gate_up_proj",
                "pwconv1", "mixer.in_proj")
GATED_IN = ("gate_up_proj", "mixer.in_proj")        # one projection holding two halves (gate | up, Mamba's x | z)
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head", "dim_head")
# config fields, first match wins
HEAD_FIELDS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
KV_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
FFN_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size")
# fields that equal the hidden size in a dense config and must follow it (OPT embeddings, DeBERTa pooler)
HIDDEN_TWINS = ("word_embed_proj_dim", "pooler_hidden_size")


def is_hf(model: nn.Module) -> bool:
    """Whether `model` is a Hugging Face `PreTrainedModel`, decided from its class hierarchy so that asking
    about a torchvision or plain model never imports transformers (a ~2 s import)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(model).__mro__)


def _is_config(obj) -> bool:
    return hasattr(obj, "to_dict") and hasattr(obj, "model_type") and not isinstance(obj, type)


def _out_features(m: nn.Module) -> Optional[int]:
    if isinstance(m, nn.Linear):
        return m.out_features
    if type(m).__name__ == "Conv1D":           # GPT-2 stores Linear transposed
        return m.weight.shape[1]
    return None


def _int(v) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _settable(cfg, field: str) -> bool:
    """A config field that is stored, not derived by a read-only property (Falcon's `head_dim`)."""
    prop = getattr(type(cfg), field, None)
    return not (isinstance(prop, property) and prop.fset is None)


def head_dim_of(config) -> Optional[int]:
    """The config's head size, or None when it has none as one number (per-stage lists, no heads)."""
    hd = _int(getattr(config, "head_dim", None))
    if hd:
        return hd
    h, n = _int(getattr(config, "hidden_size", None)), _int(getattr(config, "num_attention_heads", None))
    return h // n if h and n else None


def kv_heads_of(config) -> Optional[int]:
    """Key/value heads of the config (multi-query configs that say so with a flag count one)."""
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1
    for f in KV_FIELDS:
        v = _int(getattr(config, f, None))
        if v:
            return v
    return None


# ------------------------------------------------------------------------------------- config scopes
def config_paths(config, prefix: str = "") -> Dict[int, Tuple[str, object]]:
    """{id(config object): (attribute path, object)} for a config and its nested sub-configs."""
    out = {id(config): (prefix, config)}
    for k, v in vars(config).items():
        if _is_config(v) and id(v) not in out:
            out.update(config_paths(v, f"{prefix}.{k}" if prefix else k))
    return out


def resolve(config, path: str):
    for part in filter(None, path.split(".")):
        config = getattr(config, part)
    return config


def module_scopes(model: nn.Module) -> Dict[str, str]:
    """{module name: path of the (sub-)config it is built from}: the nearest ancestor holding a known config."""
    paths = config_paths(model.config)
    scope: Dict[str, str] = {}
    for name, mod in model.named_modules():
        own = getattr(mod, "config", None)
        if own is not None and id(own) in paths:
            scope[name] = paths[id(own)][0]
        else:
            scope[name] = scope.get(name.rpartition(".")[0], "") if name else ""
    return scope


# ------------------------------------------------------------------------------------- attention
def attention_modules(model: nn.Module):
    """(name, module, (attribute, q projection), k projection or None) for every attention block."""
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


def _module_head_dim(mod: nn.Module, cfg) -> Optional[int]:
    for a in HEAD_DIM_ATTRS:
        v = _int(getattr(mod, a, None))
        if v:
            return v
    return head_dim_of(cfg)


def _heads(qn: str, q, k, hd: int, cfg) -> Tuple[Optional[int], Optional[int]]:
    """(query heads, kv heads or None) of one attention block, read from its projection widths."""
    n = _out_features(q) // hd
    if k is not None:
        return n, _out_features(k) // hd
    if qn not in FUSED_QKV:
        return n, None
    h0, kv0 = _int(getattr(cfg, "num_attention_heads", None)), kv_heads_of(cfg)
    if not h0 or not kv0 or kv0 == h0:
        return n // 3, None                      # q, k, v of equal width
    if kv0 == 1:
        return n - 2, 1                          # multi-query: one shared k and v head
    per = h0 // kv0 + 2                          # grouped: (queries of a group, k, v) per kv head
    return (n // per) * (h0 // kv0), n // per


def attention_sizes(model: nn.Module, base_config):
    """(name, scope, head_dim, heads, kv heads) per attention block; sizes read from the weights."""
    scopes = module_scopes(model)
    out = []
    for name, mod, (qn, q), k in attention_modules(model):
        cfg = resolve(base_config, scopes.get(name, ""))
        hd = _module_head_dim(mod, cfg)
        if not hd:
            continue
        h, kv = _heads(qn, q, k, hd, cfg)
        out.append((name, scopes.get(name, ""), hd, h, kv))
    return out


def _ffn_sizes(model: nn.Module):
    """(scope, width, width / input width) per FFN input projection."""
    scopes = module_scopes(model)
    out = []
    for name, mod in model.named_modules():
        if any(name.endswith(f) for f in FFN_IN_NAMES) and "shared_expert" not in name:   # own config field
            f = _out_features(mod)
            if f:
                f = f // 2 if name.endswith(GATED_IN) else f
                fin = mod.in_features if isinstance(mod, nn.Linear) else mod.weight.shape[0]
                out.append((scopes.get(name, ""), f, f / fin))
    return out


def layer_sizes(model: nn.Module, base_config, scope: Optional[str] = None) -> Dict[str, List[int]]:
    """Per-layer heads, kv heads and FFN widths read from the weights (of one config scope, or all)."""
    att = [a for a in attention_sizes(model, base_config) if scope is None or a[1] == scope]
    ffn = [f for f in _ffn_sizes(model) if scope is None or f[0] == scope]
    scopes = module_scopes(model) if scope is not None else {}
    blocks = {b.name for b in moe.find_moe_blocks(model) if scope is None or scopes.get(b.name, "") == scope}
    return {"heads": [a[3] for a in att], "kv_heads": [a[4] for a in att if a[4] is not None],
            "ffn": [f[1] for f in ffn], "ffn_ratio": [f[2] for f in ffn], **moe.moe_sizes(model, blocks)}


def fix_attention_attrs(model: nn.Module, base_config) -> None:
    """Make attention modules' size attributes agree with their pruned projections."""
    mods = dict(model.named_modules())
    for name, _, hd, h, kvh in attention_sizes(model, base_config):
        mod = mods[name]
        for a in HEAD_ATTRS:
            if _int(getattr(mod, a, None)):
                setattr(mod, a, h)
        for a in WIDTH_ATTRS:
            if _int(getattr(mod, a, None)):
                setattr(mod, a, h * hd)
        if kvh is not None:
            for a in KV_ATTRS:
                if _int(getattr(mod, a, None)):
                    setattr(mod, a, kvh)
            if _int(getattr(mod, "num_key_value_groups", None)) and kvh:
                mod.num_key_value_groups = max(1, h // kvh)


# ------------------------------------------------------------------------------------- config rewrite
def _fit(current, values: List, cfg):
    """A config value holding `values` (one per layer): the same type as `current`, or None if it cannot."""
    if not values:
        return current
    if isinstance(current, (list, tuple)):
        if len(current) == len(values):
            return type(current)(values)
        depths = getattr(cfg, "depths", None)           # per-stage lists (Swin): uniform inside each stage
        if isinstance(depths, (list, tuple)) and len(depths) == len(current) and sum(depths) == len(values):
            out, i = [], 0
            for d in depths:
                stage = values[i:i + d]
                if len(set(stage)) != 1:
                    return None
                out.append(stage[0])
                i += d
            return type(current)(out)
        return None
    if len(set(values)) != 1:
        return None
    v = values[0]
    if isinstance(current, float) or (isinstance(v, float) and not float(v).is_integer()):
        return float(v)
    return int(v)


def _set(cfg, fields, values, fill_none: bool = False) -> bool:
    """Write `values` into the first stored field of `fields`; False when the config cannot hold them.
    fill_none: when no field holds a value, one stored as None (GPT-2's n_inner: "4 * hidden") is set."""
    stored = [f for f in fields if f in cfg.to_dict()]
    chosen = [f for f in stored if getattr(cfg, f, None) is not None] or (stored if fill_none and values else [])
    if not chosen:
        return True
    f, current = chosen[0], getattr(cfg, chosen[0])
    v = _fit(0 if current is None else current, values, cfg)
    if v is None:
        return False
    if isinstance(current, int) and isinstance(v, float):        # an int field (Dinov2's mlp_ratio) cannot hold
        if not v.is_integer():                                    # a fractional ratio: not expressible
            return False
        v = int(v)
    if v != current and _settable(cfg, f):
        try:
            setattr(cfg, f, v)
        except Exception:                                         # the config's own validation refused the value
            return False
    return True


def _rewrite_scope(cfg, base, sizes: Dict[str, List]) -> bool:
    if not _set(cfg, HEAD_FIELDS, sizes["heads"]):
        return False
    mha = kv_heads_of(base) == _int(getattr(base, "num_attention_heads", None))    # a fused MHA's kv = heads
    kv = sizes["kv_heads"] or (sizes["heads"] if mha else [])
    if kv and kv_heads_of(base) not in (None, 1) and not _set(cfg, KV_FIELDS, kv):
        return False
    hd = head_dim_of(base)
    if hd and _settable(cfg, "head_dim"):
        cfg.head_dim = hd           # explicit: families that read `config.head_dim` keep it when heads change
    if sizes.get("experts") and not (_set(cfg, moe.EXPERT_FIELDS, sizes["experts"])
                                     and _set(cfg, moe.TOP_K_FIELDS, sizes["top_k"])
                                     and _set(cfg, moe.EXPERT_WIDTH_FIELDS, sizes["expert_ffn"])):
        return False
    if any(f in cfg.to_dict() for f in FFN_FIELDS) and not _set(cfg, FFN_FIELDS, sizes["ffn"], fill_none=True):
        return False
    return _set(cfg, ("mlp_ratio",), sizes["ffn_ratio"])    # Dinov2 stores a ratio (and keeps unknown kwargs)


def pruned_config(model: nn.Module, base_config):
    """The base config with the pruned sizes (every sub-config too) when the config can hold them; else None."""
    cfg = base_config.__class__.from_dict(base_config.to_dict())
    hidden = _embedding_width(model)
    if hidden is not None and _int(getattr(base_config, "hidden_size", None)) and hidden != base_config.hidden_size:
        for f in HIDDEN_TWINS:
            if getattr(base_config, f, None) == base_config.hidden_size:
                setattr(cfg, f, hidden)
        cfg.hidden_size = hidden
    for path, _ in config_paths(base_config).values():
        try:
            sub = resolve(cfg, path)
        except AttributeError:
            return None
        if not _rewrite_scope(sub, resolve(base_config, path), layer_sizes(model, base_config, scope=path)):
            return None
    return cfg


def config_expresses(model: nn.Module, cfg) -> bool:
    """Would `type(model)(cfg)` have exactly the pruned model's parameter shapes? (built on the meta device)"""
    try:
        with torch.device("meta"):
            probe = type(model)(cfg)
    except Exception:
        return False
    a = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return a == b



def head_size_follows_hidden(model: nn.Module, scope: str = "") -> bool:
    """Does the (sub-)config at `scope` derive the head size from hidden_size / heads (BERT, GPT-2, OPT,
    Falcon)? Then fewer heads are expressible only with the hidden size shrunk in proportion. Decided by
    building the model on the meta device with that hidden size doubled and the head size written explicitly
    (as the config rewrite does) and seeing whether the attention widths follow, not by a list of families."""
    base = model.config
    sub = resolve(base, scope)
    hidden = _int(getattr(sub, "hidden_size", None))
    if not hidden or not head_dim_of(sub) or not _settable(sub, "hidden_size"):
        return False
    cfg = base.__class__.from_dict(base.to_dict())
    probe_sub = resolve(cfg, scope)
    probe_sub.hidden_size = 2 * hidden
    if _settable(probe_sub, "head_dim"):
        probe_sub.head_dim = head_dim_of(sub)
    try:
        with torch.device("meta"):
            probe = type(model)(cfg)
    except Exception:              # the family refuses the probe: nothing known, nothing changed
        return False
    def widths(m):
        scopes = module_scopes(m)
        return [_out_features(q) for n, _, (_, q), _ in attention_modules(m) if scopes.get(n, "") == scope]
    return widths(probe) != widths(model)


def config_valid(config, model: Optional[nn.Module] = None) -> bool:
    """Does transformers accept this config (its own validators, as save_pretrained / from_pretrained run), and
    does it read back from its JSON form -- building exactly `model`'s shapes when a model is given? (A depth
    prune leaves backbone fields such as `out_features` naming stages that no longer exist; Mamba recomputes
    `intermediate_size` from the integer `expand` on load.)"""
    check = getattr(config, "validate", None)
    try:
        if callable(check):
            check()
        again = type(config).from_dict(config.to_dict())
    except Exception:          # transformers' validators raise ValueError subclasses of several kinds
        return False
    return model is None or config_expresses(model, again)


def after_surgery(model: nn.Module, base_config) -> bool:
    """Update attention attributes and `model.config`. Returns True if the config expresses the new shapes."""
    fix_attention_attrs(model, base_config)
    cfg = pruned_config(model, base_config)
    if cfg is None or not config_expresses(model, cfg):
        return False
    old = {i: path for i, (path, _) in config_paths(model.config).items()}
    new = {path: c for path, c in ((p, o) for p, o in config_paths(cfg).values())}
    for m in model.modules():          # modules holding the config (or a sub-config) see the rewritten one
        own = getattr(m, "config", None)
        if m is not model and own is not None and id(own) in old and old[id(own)] in new:
            m.config = new[old[id(own)]]
    model.config = cfg
    return True


# ------------------------------------------------------------------------------------- residual stream
def _input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    try:
        return model.get_input_embeddings()
    except (NotImplementedError, AttributeError):     # vision/multimodal models without one token table
        return None


def _embedding_param(model: nn.Module):
    """(weight, dim holding the hidden size) of the input embeddings: token table or patch projection."""
    emb = _input_embeddings(model)
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


def _stream_members(model: nn.Module) -> set:
    """(parameter name, dim) pairs that hold a tower's hidden size: the input of every attention block (per
    stage in Swin-like towers), every embedding (token tables, patch projections, position/class embeddings)
    of every tower, found by module name, plus get_input_embeddings."""
    found = set()
    for name, _, (qn, q), _ in attention_modules(model):     # what attention reads is a tower's hidden width
        found.add((f"{name}.{qn}.weight" if name else f"{qn}.weight", 1 if isinstance(q, nn.Linear) else 0))
    w, d = _embedding_param(model)
    if w is not None:
        found.update((n, d) for n, p in model.named_parameters(remove_duplicate=False) if p is w)
    for name, mod in model.named_modules():
        if "embed" not in name.rpartition(".")[2].lower():
            continue
        for pn, p in mod.named_parameters(prefix=name):
            sub = model.get_submodule(pn.rpartition(".")[0]) if "." in pn else model
            if isinstance(sub, nn.Embedding):
                found.add((pn, 1))
            elif isinstance(sub, (nn.Linear, nn.modules.conv._ConvNd)) and pn.endswith("weight"):
                found.add((pn, 0))
            elif p.dim() >= 1 and not isinstance(sub, (nn.Linear, nn.modules.conv._ConvNd)):
                found.add((pn, p.dim() - 1))
    return found


def hidden_group_indices(graph, model: nn.Module) -> List[int]:
    """Groups that carry a residual stream (the width of some tower's input embeddings)."""
    members = _stream_members(model)
    if not members:
        return []
    return [g.index for g in graph.groups if any((m.name, m.dim) in members for m in g.members)]

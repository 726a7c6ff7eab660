"""Physical removal: slice parameters and buffers, then make module attributes agree with the new shapes.

`apply_kept` is deterministic given the plan, so `pk.load` replays exactly what `pk.prune` did on a fresh
copy of the original architecture (no scores, no trace needed).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from prunekit.nn import MultiheadAttention


def _owners(model: nn.Module, remove_duplicate=False):
    """(module, attr name, qualified name) for every parameter and buffer, tied ones included."""
    out = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in list(mod._parameters.items()):
            if p is not None:
                out.append((mod, pname, f"{mname}.{pname}" if mname else pname, p, False))
        for bname, b in list(mod._buffers.items()):
            if b is not None:
                out.append((mod, bname, f"{mname}.{bname}" if mname else bname, b, True))
    return out


def _index(t: torch.Tensor, dims: Dict[int, list]) -> torch.Tensor:
    """Keep the listed indices per dim. A list of lists along dim d > 0 keeps, in each slice along dim 0 (after
    dim 0's own selection), that slice's indices: stacked experts keep their own neurons, the same count each."""
    for d, keep in sorted(dims.items()):
        if keep and isinstance(keep[0], (list, tuple)):
            if int(d) == 0 or len(keep) != t.shape[0] or len({len(k) for k in keep}) != 1:
                raise IndexError(f"per-slice kept indices for dim {d} need one equal-length list per slice "
                                 f"along dim 0 ({t.shape[0]}), got {len(keep)}")
            t = torch.stack([s.index_select(int(d) - 1, torch.as_tensor(k, dtype=torch.long, device=t.device))
                             for s, k in zip(t.unbind(0), keep)])
        else:
            t = t.index_select(int(d), torch.as_tensor(keep, dtype=torch.long, device=t.device))
    return t


def apply_kept(model: nn.Module, kept: Dict[str, Dict[int, List[int]]], attrs: Sequence[Tuple[str, str, int]] = ()):
    """Slice every tensor named in `kept` ({name: {dim: kept indices}}) in place and fix module attributes."""
    conv_old = {name: (m.in_channels, m.out_channels, m.groups) for name, m in model.named_modules()
                if isinstance(m, nn.modules.conv._ConvNd)}
    # tensors are identified by object so that tied parameters are sliced once and stay tied
    name_of = {}
    for mod, attr, qname, t, is_buf in _owners(model):
        name_of.setdefault(id(t), qname)
    resolved = {}
    for mod, attr, qname, t, is_buf in _owners(model):
        key = id(t)
        canonical = name_of[key]
        spec = kept.get(qname) or kept.get(canonical)
        if not spec:
            continue
        if key not in resolved:
            with torch.no_grad():
                data = _index(t.detach(), {int(k): v for k, v in spec.items()}).clone()
            if is_buf:
                resolved[key] = data
            else:
                p = nn.Parameter(data, requires_grad=t.requires_grad)
                resolved[key] = p
        new = resolved[key]
        if is_buf:
            mod._buffers[attr] = new
        else:
            mod._parameters[attr] = new
    missing = set(kept) - {q for _, _, q, _, _ in _owners(model)}
    if missing:
        raise KeyError(f"plan names tensors this model does not have: {sorted(missing)[:5]}; "
                       f"the model must be the same architecture the plan was made for")
    for mname, attr, value in attrs:
        setattr(model.get_submodule(mname) if mname else model, attr, value)
    _fix_module_attrs(model, conv_old)     # known module types: sizes straight from their weights
    return model


KNOWN_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
               nn.Embedding, nn.PReLU)


def is_known_module(m: nn.Module) -> bool:
    """Modules whose size attributes `_fix_module_attrs` derives from their weights."""
    return isinstance(m, KNOWN_TYPES + (MultiheadAttention,)) or type(m).__name__ == "Conv1D"


def _fix_module_attrs(model: nn.Module, conv_old):
    for name, m in model.named_modules():
        if isinstance(m, MultiheadAttention):
            m.num_heads = m.q_proj.weight.shape[0] // m.head_dim
            m.embed_dim = m.out_proj.weight.shape[0]
        elif isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight
            old_in, old_out, old_g = conv_old[name]
            transposed = m.transposed
            out_ch = w.shape[1] * old_g if transposed else w.shape[0]
            if old_g > 1 and old_in == old_g:           # depthwise-like: one group per input channel
                mult = old_out // old_g
                g = out_ch // mult
                m.groups = g
                m.in_channels = g
            else:
                m.in_channels = (w.shape[0] if transposed else w.shape[1] * old_g)
            m.out_channels = out_ch
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):     # transformers' transposed Linear (GPT-2)
            m.nx, m.nf = m.weight.shape
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            src = m.weight if m.weight is not None else m.running_mean
            if src is not None:
                m.num_features = src.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            m.num_channels = m.weight.shape[0]
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif isinstance(m, nn.PReLU):
            m.num_parameters = m.weight.numel()
        elif hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)

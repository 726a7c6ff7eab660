"""Parameter and MAC counts, from the same tracer the dependency graph uses (one forward pass)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from prunekit.batch import eval_mode
from prunekit.graph.tracer import trace


def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of one forward pass on `example_inputs` (conv, linear, matmul, attention)."""
    with eval_mode(model):
        tr = trace(model, example_inputs)
    return int(sum(c.base for c in tr.costs))


# ----------------------------------------------------------------------------------------------- size
def quantized_plain_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Plain tensors for dynamically quantized Linear layers (packed params are opaque to state_dict savers):
    int8 weight, its scale/zero point, and the float bias."""
    out = {}
    for name, mod in model.named_modules():
        packed = getattr(mod, "_packed_params", None)
        if packed is None or not hasattr(packed, "_weight_bias"):
            continue
        w, b = packed._weight_bias()
        out[f"{name}.weight_int8"] = w.int_repr().contiguous()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[f"{name}.weight_scale"] = w.q_per_channel_scales().float()
            out[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().int()
        else:
            out[f"{name}.weight_scale"] = torch.tensor([w.q_scale()], dtype=torch.float32)
            out[f"{name}.weight_zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int32)
        if b is not None:
            out[f"{name}.bias"] = b.detach().contiguous()
    return out


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Number of weights: tied parameters once, parametrized tensors (sparse masks) as the value the forward
    uses, plus the int8 weights and biases of dynamically quantized layers (which have no Parameters).

    nonzero=True counts only non-zero entries, which is what unstructured (masked) pruning reduces."""
    def size(t: torch.Tensor) -> int:
        return int(torch.count_nonzero(t)) if nonzero else t.numel()

    seen, total = set(), 0
    for m in model.modules():
        if not parametrize.is_parametrized(m):
            continue
        for pname, plist in m.parametrizations.items():
            seen.update(id(p) for p in plist.parameters())      # the original and any parametrization state
            with torch.no_grad():
                total += size(getattr(m, pname))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += size(p)
    for k, v in quantized_plain_tensors(model).items():
        if k.endswith(".weight_int8") or k.endswith(".bias"):
            total += size(v)
    return total

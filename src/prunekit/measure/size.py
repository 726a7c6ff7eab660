"""TODO"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from prunekit.measure.counts import count_params, quantized_plain_tensors


def plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict safetensors can store: quantized layers unpacked to int8 + scales, tied tensors kept once
    (as `safetensors.torch.save_model` does), non-tensor entries dropped."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor) or v.is_quantized:
            continue
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = (v.to_dense() if v.is_sparse else v).cpu().clone()  # clone: safetensors refuses shared storage
    out.update({k: v.cpu() for k, v in quantized_plain_tensors(model).items()})
    return out


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's weights saved as safetensors (in memory; nothing is written)."""
    from safetensors.torch import save
    return len(save(plain_state_dict(model)))


def model_stats(model: nn.Module, example_inputs=None, macs_fn: Optional[Callable] = None) -> Dict[str, Any]:
    """Params, size on disk and, when a MAC counter is available, MACs for `example_inputs`.

    macs_fn(model, example_inputs) -> int; defaults to `prunekit.flops.count_macs` when that module exists.
    """
    out = {"params": count_params(model), "size_bytes": size_on_disk(model), "macs": None}
    if example_inputs is not None:
        if macs_fn is None:
            try:
                pass
            except ImportError:
                macs_fn = None
        if macs_fn is not None:
            out["macs"] = int(macs_fn(model, example_inputs))
    return out

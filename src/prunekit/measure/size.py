"""Size of a model's weights as stored (safetensors bytes), and its summary numbers (params, size, MACs)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from prunekit.measure.counts import count_macs, count_params, quantized_plain_tensors


def without_shared_storage(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state` with each group of tensors that view the same memory (tied weights) kept once, under its
    first name: what safetensors can store and what `save_model` keeps."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype) \
            if v.numel() else None
        if key is None or key not in seen:
            seen.add(key)
            out[k] = v
    return out


def storable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict safetensors can store: quantized layers unpacked to int8 + scales, tied tensors kept once
    (as `safetensors.torch.save_model` does), non-tensor entries dropped."""
    plain = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_quantized
             and not v.is_sparse}
    out = {k: v.cpu().clone() for k, v in without_shared_storage(plain).items()}   # clone: no shared storage
    out.update({k: v.to_dense().cpu() for k, v in model.state_dict().items()
                if isinstance(v, torch.Tensor) and v.is_sparse})
    out.update({k: v.cpu() for k, v in quantized_plain_tensors(model).items()})
    return out


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's weights saved as safetensors (in memory; nothing is written)."""
    from safetensors.torch import save
    return len(save(storable_state_dict(model)))


def model_stats(model: nn.Module, example_inputs=None, macs_fn: Optional[Callable] = None) -> Dict[str, Any]:
    """Params, size on disk and, when a MAC counter is available, MACs for `example_inputs`.

    macs_fn(model, example_inputs) -> int; defaults to `count_macs` (the graph tracer's count).
    """
    out = {"params": count_params(model), "size_bytes": size_on_disk(model), "macs": None}
    if example_inputs is not None:
        out["macs"] = int((macs_fn or count_macs)(model, example_inputs))
    return out

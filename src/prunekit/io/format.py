"""Save and load pruned models: safetensors weights + a JSON plan. No pickle anywhere.

Layout of a saved directory:
    plan.json           what was cut: {"format", "kept": {tensor: {dim: kept indices}}, "attrs": [...], ...}
    model.safetensors   the pruned model's state_dict (tied tensors stored once)
    prunekit.json       {"prunekit_version", "files": {name: sha256}} for integrity checks

`load(dir, model=fresh_original)` replays the plan on a fresh instance of the original architecture (slicing
its tensors to the pruned shapes, fixing module attributes) and then loads the saved weights, strictly.
Loading never executes code from the files: JSON and safetensors only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch.nn as nn

from prunekit.errors import LoadError
from prunekit.io.atomic import atomic_write_json
from prunekit.io.hf import load_hf, save_hf
from prunekit.io.state import META, PLAN, WEIGHTS, _sha, load_state, read_plan, replay, save_weights
from prunekit.version import __version__


def save(result, path: Union[str, Path]) -> Path:
    """Write `result.model` (safetensors) and `result.plan` (JSON) into directory `path`.

    Hugging Face models are written as a Hugging Face directory (see prunekit.hf) as well."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = result.model if hasattr(result, "model") else result
    plan = getattr(result, "plan", None) or {"format": "prunekit.structured/1", "kept": {}, "attrs": []}
    hf_save = getattr(model, "save_pretrained", None)
    if callable(hf_save) and plan.get("format", "").startswith(("prunekit.structured", "prunekit.layers",
                                                                 "prunekit.sparse")):
        try:
            save_hf(model, plan, path)
        except ImportError:
            pass
    atomic_write_json(path / PLAN, plan)
    save_weights(model, path / WEIGHTS, metadata={"format": "pt"})
    atomic_write_json(path / META, {"prunekit_version": __version__,
                                    "files": {n: _sha(path / n) for n in (PLAN, WEIGHTS)}})
    return path


def load(path: Union[str, Path], model: Optional[nn.Module] = None, strict: bool = True) -> nn.Module:
    """Rebuild a pruned model saved by `pk.save`.

    model: a fresh instance of the original (unpruned) architecture; its weights are replaced. For Hugging Face
           directories written by pk.save it may be omitted (the pruned config is read from the directory).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    plan = read_plan(path)
    if model is None:
        return load_hf(path, plan)
    replay(model, plan)
    try:
        sd = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"pk.load: '{path / WEIGHTS}' is not a readable safetensors file ({e})") from e
    load_state(model, sd, strict=strict, where=str(path / WEIGHTS))
    return model

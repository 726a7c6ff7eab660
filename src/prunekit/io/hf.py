"""Hugging Face directories: save_pretrained files plus the base config, and loading them back without prunekit's
original model. Shapes come from the weights file: a plan replay gives the structure, the tensors the widths."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch.nn as nn

from prunekit.errors import LoadError
from prunekit.io.state import WEIGHTS, fit_to_tensors, load_state, plain_state_dict, replay
from prunekit.layers.depth import replay_layers
from prunekit.models.hf import after_surgery, config_expresses

BASE_CONFIG = "prunekit_base_config.json"


def save_hf(model: nn.Module, plan: Dict[str, Any], path: Path) -> None:
    base = plan.get("hf_base_config")
    model.save_pretrained(str(path), safe_serialization=True, state_dict=plain_state_dict(model))
    if base is not None:
        (path / BASE_CONFIG).write_text(json.dumps(base, indent=1))
        # checked on the model, not trusted from the plan: a depth prune of a width-pruned model records
        # hf_config_exact=True while its config still holds the unpruned widths
        if not (plan.get("hf_config_exact", False) and config_expresses(model, model.config)):
            # from_pretrained cannot express these shapes: keep config.json the base architecture and say so
            d = dict(base)
            d["prunekit_note"] = "per-layer pruned widths; load with prunekit.load(dir)"
            (path / "config.json").write_text(json.dumps(d, indent=1))


def load_hf(path: Path, plan: Dict[str, Any]) -> nn.Module:
    """Rebuild an HF model saved by pk.save without the original weights: base config -> replay -> weights."""
    import transformers
    from safetensors.torch import load_file

    base_file = path / BASE_CONFIG
    if not base_file.is_file():
        raise LoadError(f"pk.load('{path}') without model=: '{base_file}' is missing, so the original architecture "
                        f"is unknown; pass model=<fresh original model>")
    base = json.loads(base_file.read_text())
    arch = plan.get("hf_class") or (base.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise LoadError(f"pk.load('{path}'): unknown architecture {arch!r} in {BASE_CONFIG}")
    cfg = transformers.AutoConfig.for_model(base["model_type"], **{k: v for k, v in base.items()
                                                                     if k != "model_type"})
    model = cls(cfg)
    sd = load_file(str(path / WEIGHTS))
    if plan.get("format", "").startswith("prunekit.layers"):
        replay_layers(model, plan)
        # the blocks may have been width-pruned before the depth prune: their widths are in the tensors
        if fit_to_tensors(model, sd):
            after_surgery(model, cfg)
            if getattr(cfg, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
                model.tie_weights()           # resizing replaced the tied parameter
    else:
        replay(model, plan)
        after_surgery(model, cfg)
    load_state(model, sd, strict=True, where=str(path / WEIGHTS))
    return model.eval()

"""Hugging Face directories: save_pretrained files plus the base config, and loading them back without prunekit's
original model. Shapes come from the weights file: a plan replay gives the structure, the tensors the widths."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn

from prunekit.errors import LoadError, SaveError
from prunekit.io.schema import safe_file
from prunekit.io.state import WEIGHTS, baked_state_dict, fit_to_tensors, load_state, replay
from prunekit.models.hf import after_surgery, config_valid
from prunekit.plan import Plan

BASE_CONFIG = "prunekit_base_config.json"

def save_hf(model: nn.Module, plan: Plan, path: Path) -> None:
    base = plan.hf_base_config
    exact = plan.hf_config_exact and config_valid(model.config, model)
    pruned_cfg = model.config
    if base is not None and not exact:
        # transformers validates the config while saving (e.g. hidden size a multiple of the heads): save the
        # base config, which always validates, and let pk.load rebuild the shapes from the plan and tensors
        try:
            model.config = type(pruned_cfg).from_dict(base)
        except Exception as e:         # transformers' validators raise several exception types
            raise SaveError(f"pk.save: the base config recorded in the plan ({plan.hf_class}) does not pass "
                            f"transformers' validation ({str(e).strip().splitlines()[-1].strip()}); pk.save the "
                            f"first pruning step's result (its plan records the unpruned architecture), or run "
                            f"the steps in another order") from e
    try:
        model.save_pretrained(str(path), safe_serialization=True, state_dict=baked_state_dict(model))
    finally:
        model.config = pruned_cfg
    if base is not None:
        (path / BASE_CONFIG).write_text(json.dumps(base, indent=1))
        # checked on the model, not trusted from the plan: a depth prune of a width-pruned model records
        # hf_config_exact=True while its config still holds the unpruned widths
        if not exact:
            # from_pretrained cannot express these shapes: keep config.json the base architecture and say so
            d = dict(base)
            d["prunekit_note"] = "per-layer pruned widths; load with prunekit.load(dir)"
            (path / "config.json").write_text(json.dumps(d, indent=1))

def _saved_dtype(sd: Dict[str, torch.Tensor]):
    """The floating dtype most of the saved weights have (None if there are no floating tensors)."""
    counts: Dict[torch.dtype, int] = {}
    for t in sd.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else None

def load_hf(path: Path, plan: Plan) -> nn.Module:
    """Rebuild an HF model saved by pk.save without the original weights: base config -> replay -> weights.

    The model comes back in the dtype its weights were saved in (a bf16 model stays bf16)."""
    import transformers
    from safetensors.torch import load_file

    where = f"pk.load('{path}') without model="
    if not (path / BASE_CONFIG).exists():
        raise LoadError(f"{where}: '{path / BASE_CONFIG}' is missing, so the original architecture is unknown; "
                        f"pass model=<fresh original model>")
    try:
        base = json.loads(safe_file(path, BASE_CONFIG, where).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LoadError(f"{where}: '{path / BASE_CONFIG}' is not valid JSON ({e}); re-save with pk.save") from e
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        raise LoadError(f"{where}: '{path / BASE_CONFIG}' has no 'model_type'; re-save with pk.save")
    arch = plan.hf_class or (base.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise LoadError(f"{where}: unknown architecture {arch!r} in {BASE_CONFIG}/plan; pass model=<fresh "
                        f"original model>")
    try:
        cfg = transformers.AutoConfig.for_model(base["model_type"], **{k: v for k, v in base.items()
                                                                         if k != "model_type"})
        model = cls(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise LoadError(f"{where}: cannot build {arch} from {BASE_CONFIG} ({e}); pass model=<fresh original "
                        f"model>") from e
    sd = load_file(str(safe_file(path, WEIGHTS, where)))
    replay(model, plan)
    if plan.kind == "layers":
        # the blocks may have been width-pruned before the depth prune: their widths are in the tensors
        if fit_to_tensors(model, sd):
            after_surgery(model, cfg)
            if getattr(cfg, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
                model.tie_weights()           # resizing replaced the tied parameter
    else:
        after_surgery(model, cfg)
    dtype = _saved_dtype(sd)
    if dtype is not None:
        model.to(dtype)
    load_state(model, sd, strict=True, where=str(path / WEIGHTS))
    return model.eval()

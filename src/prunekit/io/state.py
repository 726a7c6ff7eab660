"""The pieces of the saved format that loaders share: file names, state dicts with tied tensors once, plan replay."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from prunekit.errors import LoadError
from prunekit.io.atomic import save_safetensors_atomic
from prunekit.io.schema import check_plan_fits, safe_file, sha256_file, validate_plan
from prunekit.layers.depth import replay_layers
from prunekit.measure.size import without_shared_storage
from prunekit.models import hf
from prunekit.nn import convert_mha
from prunekit.plan import Plan
from prunekit.sparse.masks import SparseMask
from prunekit.structured.surgery import apply_kept

PLAN = "plan.json"
WEIGHTS = "model.safetensors"
META = "prunekit.json"


def baked_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """state_dict where tensors parametrized by a sparse mask appear as their plain masked value under the
    original name, so the file loads into an ordinary model. The model's own parametrizations (wav2vec2's
    weight norm: `parametrizations.weight.original0/1`) are part of its architecture and stay as they are."""
    from torch.nn.utils import parametrize
    sd = dict(model.state_dict(keep_vars=False))
    for mname, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        prefix = f"{mname}." if mname else ""
        for pname in list(m.parametrizations.keys()):
            if not any(isinstance(p, SparseMask) for p in m.parametrizations[pname]):
                continue
            for k in [k for k in sd if k.startswith(f"{prefix}parametrizations.{pname}.")]:
                del sd[k]
            sd[prefix + pname] = getattr(m, pname).detach()
    return sd


def state_dict_unique(model: nn.Module) -> Dict[str, torch.Tensor]:
    """state_dict with each tied tensor once (safetensors refuses shared storage)."""
    return {k: v.detach().contiguous().clone() for k, v in without_shared_storage(baked_state_dict(model)).items()}


def save_weights(model: nn.Module, path: Union[str, Path], metadata: Optional[Dict[str, str]] = None):
    save_safetensors_atomic(state_dict_unique(model), path, metadata=metadata)


def read_manifest(path: Path, verify: bool = True) -> Dict[str, str]:
    """The checked `prunekit.json` file list {name: sha256}, after verifying every listed file's checksum.

    A missing manifest is an error unless `verify=False` (then nothing is checked and {} is returned)."""
    if not verify:
        return {}
    where = f"pk.load('{path}')"
    if not (path / META).exists() and not (path / META).is_symlink():
        raise LoadError(f"{where}: checksum manifest '{path / META}' is missing, so corrupt weights could load "
                        f"silently; re-save with pk.save, or pass verify=False to load unverified")
    meta_file = safe_file(path, META, where)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{where}: '{meta_file}' is not valid JSON ({e}); re-save with pk.save") from e
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise LoadError(f"{where}: '{meta_file}' has no 'files' mapping {{name: sha256}}; re-save with pk.save")
    for n in (PLAN, WEIGHTS):
        if n not in files:
            raise LoadError(f"{where}: '{meta_file}' does not list '{n}', so it cannot be verified; re-save with "
                            f"pk.save")
    for n, digest in files.items():
        if sha256_file(safe_file(path, n, where)) != digest:
            raise LoadError(f"{where}: '{path / n}' does not match its checksum in {META}: the file is "
                            f"corrupt or was changed after saving")
    return files


def read_plan(path: Union[str, Path], verify: bool = True) -> Tuple[Plan, Dict[str, str]]:
    """(plan, verified manifest file list) of a saved directory; verify=False skips the manifest. The JSON is
    checked against the schema (io/schema.py: ranges, confined names, attribute allow-list) before it becomes
    a typed `Plan`."""
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"pk.load: '{path}' is not a directory; expected a folder written by pk.save")
    where = f"pk.load('{path}')"
    for n in (PLAN, WEIGHTS):
        safe_file(path, n, where)
    files = read_manifest(path, verify)
    try:
        plan = json.loads(safe_file(path, PLAN, where).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LoadError(f"pk.load: '{path / PLAN}' is not valid JSON ({e})") from e
    where = f"pk.load: '{path / PLAN}'"
    return Plan.from_dict(validate_plan(plan, where), where=where), files


def replay(model: nn.Module, plan: Union[Plan, Dict[str, Any]]) -> nn.Module:
    """Apply a plan (a `Plan`, or its validated JSON form) to a fresh model of the original architecture
    (in place)."""
    plan = plan.to_dict() if isinstance(plan, Plan) else plan
    check_plan_fits(model, plan, "pk.load")
    try:
        if plan.get("format", "").startswith("prunekit.layers"):
            return replay_layers(model, Plan.from_dict(plan, where="pk.load: plan"))
        if plan.get("convert_mha"):
            convert_mha(model, plan["convert_mha"])
        kept = {n: {int(d): v for d, v in dims.items()} for n, dims in plan.get("kept", {}).items()}
        apply_kept(model, kept, [tuple(a) for a in plan.get("attrs", [])])
        for name in plan.get("add_bias", []):       # biases created by bias compensation; values come from the file
            lin = model.get_submodule(name)
            lin.bias = nn.Parameter(torch.zeros(lin.weight.shape[0], dtype=lin.weight.dtype))
        if hf.is_hf(model):
            hf.after_surgery(model, model.config)
    except (KeyError, AttributeError, IndexError, RuntimeError, ValueError, TypeError) as e:
        raise LoadError(f"pk.load: the plan does not fit this model ({e}); pass the same architecture the "
                        f"pruned model was made from") from e
    return model


def fit_to_tensors(model: nn.Module, sd: Dict[str, torch.Tensor]) -> bool:
    """Resize Linear / Embedding modules and 1-D parameters (norms, biases) whose saved tensor has another shape,
    so the model takes the shapes the weights file holds. Returns True if anything changed."""
    changed = False
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        w = sd.get(prefix + "weight")
        own = getattr(mod, "weight", None)
        if w is None or not isinstance(own, nn.Parameter) or own.shape == w.shape:
            continue
        if isinstance(mod, nn.Linear) and w.dim() == 2:
            mod.out_features, mod.in_features = w.shape
        elif isinstance(mod, nn.Embedding) and w.dim() == 2:
            mod.num_embeddings, mod.embedding_dim = w.shape
        elif own.dim() != 1 or w.dim() != 1:
            raise LoadError(f"pk.load: '{prefix}weight' is {tuple(w.shape)} in the file but {tuple(own.shape)} "
                            f"in the model and {type(mod).__name__} cannot be resized; pass model=<the pruned "
                            f"architecture>")
        mod.weight = nn.Parameter(torch.empty(w.shape, dtype=own.dtype), requires_grad=own.requires_grad)
        b = sd.get(prefix + "bias")
        if isinstance(getattr(mod, "bias", None), nn.Parameter) and b is not None:
            mod.bias = nn.Parameter(torch.empty(b.shape, dtype=mod.bias.dtype))
        changed = True
    return changed


def load_state(model: nn.Module, sd: Dict[str, torch.Tensor], strict: bool = True, where: str = "weights"):
    """load_state_dict that tolerates tied tensors stored once and explains shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    # tied tensors were saved under one name: fill the others from it
    by_ptr = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    for names in by_ptr.values():
        have = [n for n in names if n in sd]
        if have:
            for n in names:
                sd.setdefault(n, sd[have[0]])
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        raise LoadError(f"{where}: tensors do not match the model (missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}); was it saved from this architecture?")
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise LoadError(f"{where}: '{k}' has shape {tuple(v.shape)} but the model expects "
                            f"{tuple(own[k].shape)}; the plan and the weights disagree")
    from collections import OrderedDict
    sd = OrderedDict(sd)
    meta = getattr(own, "_metadata", None)     # module versions some modules check while loading (MNASNet)
    if meta is not None:
        sd._metadata = meta
    model.load_state_dict(sd, strict=strict)

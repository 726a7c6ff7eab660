"""Save and load pruned models: safetensors weights + a JSON plan. No pickle anywhere.

Layout of a saved directory:
    plan.json           what was cut: `prunekit.plan.Plan.to_dict()` ({"format", "kept", "attrs", ...})
    model.safetensors   the pruned model's state_dict (tied tensors stored once)
    prunekit.json       {"prunekit_version", "files": {name: sha256}}: every file of the directory, checked on load

A save is a transaction: the files are written into a temp directory next to `path` and swapped in atomically
(prunekit.io.atomic.atomic_dir), so a failed save (full disk, kill) leaves the previous save unchanged.
`load(dir, model=fresh_original)` verifies the checksums (required unless verify=False), validates the plan
(prunekit.io.schema), replays it on a fresh instance of the original architecture (slicing its tensors to the
pruned shapes, fixing module attributes) and then loads the saved weights, strictly.
Loading never executes code from the files: JSON and safetensors only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch.nn as nn

from prunekit.errors import LoadError, SaveError
from prunekit.io.atomic import atomic_dir, atomic_write_json
from prunekit.io.hf import BASE_CONFIG, load_hf, save_hf
from prunekit.io.schema import safe_file, sha256_file
from prunekit.io.state import META, PLAN, WEIGHTS, load_state, read_plan, replay, save_weights
from prunekit.plan import Plan, attach_plan, plan_of
from prunekit.version import __version__


def _check_target(path: Path) -> None:
    """Refuse to replace something that is not an earlier pk.save directory (its other files would be lost)."""
    if path.is_symlink() or path.exists() and not path.is_dir():
        raise SaveError(f"pk.save: '{path}' exists and is not a directory; pass a new or empty directory")
    if path.is_dir() and any(path.iterdir()) and not ((path / META).exists() or (path / PLAN).exists()):
        raise SaveError(f"pk.save: '{path}' is a non-empty directory that was not written by pk.save; saving "
                        f"would replace its files. Pass a new or empty directory")


def _manifest(root: Path) -> dict:
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = Path(dirpath, n).relative_to(root).as_posix()
            if rel != META:
                files[rel] = sha256_file(root / rel)
    return {"prunekit_version": __version__, "files": files}


def save(result, path: Union[str, Path]) -> Path:
    """Write `result.model` (safetensors) and `result.plan` (JSON) into directory `path`, atomically.

    Hugging Face models are written as a Hugging Face directory (see prunekit.io.hf) as well."""
    path = Path(path)
    _check_target(path)
    # a module is saved as itself: Hugging Face causal LMs have a `.model` attribute (their inner decoder)
    bare = isinstance(result, nn.Module)
    model = result if bare or not hasattr(result, "model") else result.model
    # a bare model carries the plan pk.prune / pk.load attached to it (e.g. saved after pk.recover)
    plan = Plan.from_dict((None if bare else getattr(result, "plan", None)) or plan_of(model) or Plan(),
                          where="pk.save: result.plan")
    hf_save = getattr(model, "save_pretrained", None)
    try:
        with atomic_dir(path) as tmp:
            if callable(hf_save):
                try:
                    save_hf(model, plan, tmp)
                except ImportError:
                    pass
            atomic_write_json(tmp / PLAN, plan.to_dict())
            save_weights(model, tmp / WEIGHTS, metadata={"format": "pt"})
            atomic_write_json(tmp / META, _manifest(tmp))
    except OSError as e:
        raise SaveError(f"pk.save: writing '{path}' failed ({e.strerror or e}); the previous contents of "
                        f"'{path}' are unchanged. Free disk space or fix permissions and save again") from e
    return path


def load(path: Union[str, Path], model: Optional[nn.Module] = None, strict: bool = True,
         verify: bool = True) -> nn.Module:
    """Rebuild a pruned model saved by `pk.save`.

    model:  a fresh instance of the original (unpruned) architecture; its weights are replaced. For Hugging Face
            directories written by pk.save it may be omitted (the pruned config is read from the directory, and
            the model comes back in the dtype of the saved weights).
    verify: check every file against the checksums in prunekit.json (required); False loads unverified files.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    plan, files = read_plan(path, verify)
    if model is None:
        if verify and BASE_CONFIG not in files and (path / BASE_CONFIG).exists():
            raise LoadError(f"pk.load('{path}'): {META} does not list {BASE_CONFIG}, so it cannot be verified; "
                            f"re-save with pk.save or pass verify=False")
        model = load_hf(path, plan)
        attach_plan(model, plan)
        return model
    replay(model, plan)
    weights = safe_file(path, WEIGHTS, f"pk.load('{path}')")
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"pk.load: '{weights}' is not a readable safetensors file ({e})") from e
    load_state(model, sd, strict=strict, where=str(weights))
    attach_plan(model, plan)
    return model

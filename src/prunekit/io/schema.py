"""What a loader checks before it trusts a saved directory: confined file names, bounded checksums and the plan
schema (types, ranges, attribute allow-list), all before the model is touched.

* File names from `prunekit.json` or the plan must be plain relative names inside the directory: no absolute
  paths, no `..`, no symlink leading outside, nothing but regular files (no FIFOs, devices or /proc files,
  which can block or never end). Hashing reads at most the size `stat` reported.
* Plan fields are checked against `PLAN_FIELDS`: every value's JSON type and range; `kept` indices are ints
  >= 0; `attrs` may only set an existing size attribute (an int, or a list of ints) of a module, never a
  private name or a method such as `forward`.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Dict

import torch.nn as nn

from prunekit.errors import LoadError

FORMATS = ("prunekit.structured/1", "prunekit.sparse/1", "prunekit.layers/1")
_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# torch allows any character in a child module name except "." (torchvision RegNet: "block1-0");
# control characters never occur in real names
_MODULE = re.compile(r"^([^.\x00-\x1f]+(\.[^.\x00-\x1f]+)*)?$")


# --------------------------------------------------------------------------------------------- files


def safe_file(root: Path, name: Any, where: str) -> Path:
    """`root / name` after checking it stays inside `root` and is a regular file; LoadError otherwise."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise LoadError(f"{where}: file name {name!r} is not a plain relative file name; the file is corrupt "
                        f"or hand-edited (re-save with pk.save)")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise LoadError(f"{where}: file name {name!r} points outside the directory; refusing to read it "
                        f"(re-save with pk.save)")
    p = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(p)
    if os.path.commonpath([real_root, real]) != real_root:
        raise LoadError(f"{where}: '{p}' is a symlink leading outside {root}; refusing to read it")
    try:
        st = os.stat(real)
    except OSError:
        raise LoadError(f"{where}: '{p}' is missing; the directory was not written completely by pk.save "
                        f"(re-run the save)") from None
    if not stat.S_ISREG(st.st_mode):
        raise LoadError(f"{where}: '{p}' is not a regular file (a FIFO, device or directory); refusing to read it")
    return p


def sha256_file(path: Path) -> str:
    """sha256 of a regular file, reading no more than the size it had when opened (a growing file is an error)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        left = size
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        if left or f.read(1):
            raise LoadError(f"'{path}' changed size while it was being hashed ({size} bytes at open); a file "
                            f"being written cannot be loaded")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- plan schema


def _bad(where: str, key: str, what: str, got: Any) -> LoadError:
    text = repr(got)
    text = text if len(text) <= 60 else text[:57] + "..."
    return LoadError(f"{where}: plan field '{key}' must be {what}, got {text}; the plan is corrupt or "
                     f"hand-edited (re-save with pk.save)")


def _index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _kept(v, where, key):
    if not isinstance(v, dict):
        raise _bad(where, key, "a mapping {tensor name: {dim: [kept indices]}}", v)
    for name, dims in v.items():
        if not _MODULE.match(name) or not name or not isinstance(dims, dict):
            raise _bad(where, f"{key}.{name}", "a tensor name mapping to {dim: [kept indices]}", dims)
        for d, idx in dims.items():
            if not (isinstance(d, str) and d.isdigit() and len(d) < 3):
                raise _bad(where, f"{key}.{name}", "keyed by dimension numbers ('0', '1', ...)", d)
            rows = idx if isinstance(idx, list) and idx and all(isinstance(r, list) for r in idx) else [idx]
            if d == "0" and len(rows) > 1 or not all(                 # per-slice rows: stacked experts
                    isinstance(r, list) and all(_index(i) for i in r) and len(set(r)) == len(r) for r in rows):
                raise _bad(where, f"{key}.{name}.{d}", "a list of distinct ints >= 0 (or one per slice of dim 0)",
                           idx)


def _attrs(v, where, key):
    if not isinstance(v, list):
        raise _bad(where, key, "a list of [module, attribute, size]", v)
    for i, a in enumerate(v):
        ok = isinstance(a, list) and len(a) == 3 and isinstance(a[0], str) and _MODULE.match(a[0]) \
            and isinstance(a[1], str) and _IDENT.match(a[1]) \
            and (_index(a[2]) or isinstance(a[2], list) and all(_index(x) for x in a[2]))
        if not ok:
            raise _bad(where, f"{key}[{i}]", "[module name, public attribute name, int >= 0 or list of ints]", a)


def _names(v, where, key):
    if not isinstance(v, list) or not all(isinstance(n, str) and _MODULE.match(n) for n in v):
        raise _bad(where, key, "a list of module names", v)


def _layer_list(v, where, key):
    if not isinstance(v, list) or not all(_index(i) for i in v) or len(set(v)) != len(v):
        raise _bad(where, key, "a list of distinct layer indices >= 0", v)


def _typed(types, what) -> Callable:
    def check(v, where, key):
        if not isinstance(v, types) or isinstance(v, bool) and bool not in types:
            raise _bad(where, key, what, v)
    return check


def _hf_class(v, where, key):
    if not isinstance(v, str) or not _IDENT.match(v):
        raise _bad(where, key, "a transformers class name", v)


PLAN_FIELDS: Dict[str, Callable] = {
    "format": _typed((str,), f"one of {FORMATS}"), "kept": _kept, "attrs": _attrs, "add_bias": _names,
    "convert_mha": _names, "removed_layers": _layer_list, "removed_blocks": _names, "blocks": _typed((str, type(None)), "a module name"),
    "hf_base_config": _typed((dict, type(None)), "a Hugging Face config mapping"), "hf_class": _hf_class,
    "hf_config_exact": _typed((bool,), "true or false"), "type": _typed((str,), "a config type name"),
    # informational, never replayed: any JSON value
    "config": lambda *a: None, "groups": lambda *a: None, "layers": lambda *a: None, "owl": lambda *a: None,
    "allocation": lambda *a: None, "steps": lambda *a: None,
}


def validate_plan(plan: Any, where: str) -> Dict[str, Any]:
    """Check every field of a loaded plan (see PLAN_FIELDS); returns it unchanged or raises LoadError."""
    if not isinstance(plan, dict):
        raise LoadError(f"{where}: is not a prunekit plan (a JSON object with 'format' and 'kept'); re-save "
                        f"with pk.save")
    if "format" not in plan and "kept" not in plan:
        raise LoadError(f"{where}: is not a prunekit plan (no 'format'/'kept' entry); re-save with pk.save")
    for key, value in plan.items():
        check = PLAN_FIELDS.get(key)
        if check is not None:                            # other fields are informational and never replayed
            check(value, where, key)
    fmt = plan.get("format", FORMATS[0])
    if fmt not in FORMATS:
        raise _bad(where, "format", f"one of {FORMATS}", fmt)
    if fmt == "prunekit.layers/1" and "removed_layers" not in plan:
        raise LoadError(f"{where}: a prunekit.layers/1 plan needs 'removed_layers'; re-save with pk.save")
    return plan


def check_plan_fits(model: nn.Module, plan: Dict[str, Any], where: str) -> None:
    """Before any surgery: every tensor, dimension, index and attribute the plan names exists in `model`."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for name, dims in plan.get("kept", {}).items():
        t = tensors.get(name)
        if t is None:
            continue                                     # may appear after convert_mha; apply_kept names it
        for d, idx in dims.items():
            d = int(d)
            flat = [i for r in idx for i in (r if isinstance(r, list) else [r])]
            if d >= t.dim() or (flat and max(flat) >= t.shape[d]):
                raise LoadError(f"{where}: plan keeps indices {max(flat) if flat else ''} of dim {d} of '{name}' "
                                f"with shape {tuple(t.shape)}; pass the same architecture the pruned model was "
                                f"made from")
    modules = dict(model.named_modules())
    for name in plan.get("removed_blocks", []):
        if name not in modules:
            raise LoadError(f"{where}: plan removes block '{name}', which this model does not have; pass the "
                            f"same architecture the pruned model was made from")
    for mname, attr, value in plan.get("attrs", []):
        mod = modules.get(mname)
        old = vars(mod).get(attr) if mod is not None else None
        list_ok = isinstance(value, list) and isinstance(old, (list, tuple)) and len(old) == len(value)
        if mod is None or not (_index(old) and _index(value) or list_ok):
            raise LoadError(f"{where}: plan attrs entry [{mname!r}, {attr!r}] is not an existing size attribute "
                            f"(an int or list of ints) of a module of this model; only such sizes may be set")

"""TODO"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch

PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_replace(path: PathLike, write: Callable[[str], None]) -> None:
    """Let `write(tmp_path)` fill a temp file in the target's directory, fsync it, then os.replace it over
    `path` (readers never see a torn file); the temp file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_file(path: PathLike, write: Callable[[str], None]) -> None:
    """Public form of the temp file + fsync + os.replace writer, for formats with their own file writers."""
    _atomic_replace(path, write)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory + fsync + os.replace."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_replace(path, write)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _plain_tensors(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous, unaliased copies: safetensors refuses tensors that share storage (tied weights)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_safetensors_atomic(state: Dict[str, torch.Tensor], path: PathLike,
                            metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors as safetensors via temp file + fsync + os.replace (readers never see a torn file)."""
    from safetensors.torch import save_file
    _atomic_replace(path, lambda tmp: save_file(_plain_tensors(state), tmp, metadata=metadata))

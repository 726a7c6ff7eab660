"""Writes that never leave a torn or half-replaced file or directory behind.

`atomic_write_*` / `save_safetensors_atomic` fill a temp file next to the target, fsync it and os.replace it.
`atomic_dir(target)` is the same for a whole directory: everything is written into a temp directory next to
the target, fsynced, and swapped in with one atomic rename exchange (renameat2 RENAME_EXCHANGE on Linux; a
rename dance through a backup elsewhere), so a failed or killed save leaves the previous directory unchanged.
Created files and directories get the modes the user's umask allows (tempfile's own default is 0600/0700).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Union

import torch

PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------- atomic files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: PathLike, directory: bool = False) -> None:
    """chmod `path` to what a plain open()/mkdir() would have created under the current umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_dir(path: Path) -> None:
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
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


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


# --------------------------------------------------------------------------------------------- atomic directories


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (bottom-up), so a rename of `root` publishes durable data."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS/filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def swap_in(tmp: Path, target: Path) -> None:
    """Make directory `tmp` the new `target` in one step and delete the old `target` (if any).

    A crash leaves either the old or the new directory at `target`: with RENAME_EXCHANGE there is no moment
    without one; on the fallback path the old directory is renamed to a `.<name>.old-*` backup first, and a
    failed second rename puts it back."""
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)             # tmp now holds the old directory
    else:
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, backup / "d")
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(backup / "d", target)
            raise
        finally:
            fsync_dir(target.parent)
        shutil.rmtree(backup, ignore_errors=True)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_dir(target: PathLike) -> Iterator[Path]:
    """`with atomic_dir(target) as tmp:` write the directory's files into `tmp`; on normal exit `tmp` replaces
    `target` atomically (see `swap_in`); on an exception `tmp` is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        honour_umask(tmp, directory=True)
        yield tmp
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

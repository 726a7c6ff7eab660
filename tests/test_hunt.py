"""Tests that hunt: a save on a full disk, mutated saved directories and recipes (property-based).

Every outcome must be an exact load or a PrunekitError, never silent garbage, a hang or a raw traceback."""
import errno
import os
import stat

import pytest
import torch
import torch.nn as nn

import prunekit as pk
from prunekit.io import atomic


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


X = torch.randn(2, 6)


def snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


class FullDisk:
    """Every byte prunekit writes goes through here; after `free` bytes the write fails with ENOSPC."""

    def __init__(self, free):
        self.free = free

    def write(self, path, data: bytes):
        with open(path, "wb") as f:
            n = max(0, min(len(data), self.free))
            f.write(data[:n])
            self.free -= n
            if n < len(data):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def install(self, monkeypatch):
        import safetensors.torch as st

        def save_file(tensors, filename, metadata=None):
            self.write(filename, st.save(tensors, metadata=metadata))

        def atomic_write_text(path, text):
            atomic._atomic_replace(path, lambda tmp: self.write(tmp, text.encode("utf-8")))

        monkeypatch.setattr(st, "save_file", save_file)
        monkeypatch.setattr(atomic, "atomic_write_text", atomic_write_text)


@pytest.mark.parametrize("free", [0, 1, 100, 700, 1500, 3000])
def test_save_on_full_disk_keeps_old_save(tmp_path, monkeypatch, free):
    old = pk.prune(small(), pk.Structured(ratio=0.25), example_inputs=X)
    d = pk.save(old, tmp_path / "save")
    before = snapshot(d)
    new = pk.prune(small(), pk.Structured(ratio=0.5), example_inputs=X)
    FullDisk(free).install(monkeypatch)
    try:
        pk.save(new, d)
        failed = False
    except pk.SaveError as e:
        assert "unchanged" in str(e) and "\n" not in str(e)
        failed = True
    monkeypatch.undo()
    if failed:
        assert snapshot(d) == before                       # bit-identical previous save
        expect = old.model
    else:
        expect = new.model
    again = pk.load(d, model=small())
    assert torch.equal(again(X), expect(X))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]      # no temp dirs left behind


def test_save_swap_fallback_without_rename_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    d = pk.save(pk.prune(small(), pk.Structured(ratio=0.25), example_inputs=X), tmp_path / "s")
    r = pk.prune(small(), pk.Structured(ratio=0.5), example_inputs=X)
    pk.save(r, d)
    assert torch.equal(pk.load(d, model=small())(X), r.model(X))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_swap_failure_puts_old_directory_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "t"
    target.mkdir()
    (target / "f").write_text("old")
    real_rename = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:                                 # the new directory's rename into place fails
            raise OSError(errno.EIO, "I/O error")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        with atomic.atomic_dir(target) as tmp:
            (tmp / "f").write_text("new")
    monkeypatch.undo()
    assert (target / "f").read_text() == "old"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_files_honour_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        d = pk.save(pk.prune(small(), pk.Structured(ratio=0.5), example_inputs=X), tmp_path / "s")
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p.name


def test_save_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(pk.SaveError, match="not written by pk.save"):
        pk.save(pk.prune(small(), pk.Structured(ratio=0.5), example_inputs=X), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_plan_with_non_identifier_module_names_round_trips(tmp_path):
    """torch allows '-' (torchvision RegNet's 'block1-0') and other characters in child names; the plan schema
    must accept every name torch accepts, or a valid save does not load."""
    import torch
    import torch.nn as nn
    import prunekit as pk
    torch.manual_seed(0)
    blocks = nn.Sequential()
    blocks.add_module("block1-0", nn.Conv2d(3, 8, 3, padding=1))
    blocks.add_module("act", nn.ReLU())
    blocks.add_module("block1-1", nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(1, 3, 8, 8)
    r = pk.prune(blocks, pk.Structured(ratio=0.5), example_inputs=x)
    pk.save(r, tmp_path / "s")
    fresh = nn.Sequential()
    fresh.add_module("block1-0", nn.Conv2d(3, 8, 3, padding=1))
    fresh.add_module("act", nn.ReLU())
    fresh.add_module("block1-1", nn.Conv2d(8, 4, 3, padding=1))
    loaded = pk.load(tmp_path / "s", model=fresh)
    assert torch.equal(loaded(x), r.model(x))

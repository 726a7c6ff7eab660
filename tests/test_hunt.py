"""Tests that hunt: a save on a full disk, mutated saved directories and recipes (property-based).

Every outcome must be an exact load or a PrunekitError, never silent garbage, a hang or a raw traceback."""
import errno
import json
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


# --------------------------------------------------------------------------------------------- runs know their inputs


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g)
    return [(x[i:i + 16], (x[i:i + 16, 0] > 0).long()) for i in range(0, 32, 16)]


RUN_RECIPE = {"stages": [{"prune": {"type": "Structured", "ratio": 0.5}}, {"evaluate": {"metric": "accuracy"}}]}


def _start(tmp_path):
    from prunekit.run.pipeline import run_pipeline
    out = tmp_path / "run"
    res = run_pipeline(_net(), RUN_RECIPE, train=_data(), val=_data(1), out=out, quiet=True, stop_after=1)
    assert res.status == "interrupted"
    return out


def test_resume_refuses_changed_model_data_or_recipe(tmp_path):
    from prunekit.run.pipeline import run_pipeline
    out = _start(tmp_path)
    swapped = _net()
    with torch.no_grad():
        swapped[0].weight[0, 0] += 1.0
    with pytest.raises(pk.RunError, match="input model's weights changed") as e:
        run_pipeline(swapped, RUN_RECIPE, train=_data(), val=_data(1), out=out, quiet=True, resume=True)
    assert "\n" not in str(e.value)
    with pytest.raises(pk.RunError, match=r"the data \(train/val batches\) changed"):
        run_pipeline(_net(), RUN_RECIPE, train=_data(5), val=_data(1), out=out, quiet=True, resume=True)
    other = {"stages": [{"prune": {"type": "Structured", "ratio": 0.25}}, {"evaluate": {"metric": "accuracy"}}]}
    with pytest.raises(pk.RunError, match=r"recipe\.stages.*0\.5.*0\.25"):
        run_pipeline(_net(), other, train=_data(), val=_data(1), out=out, quiet=True, resume=True)
    res = run_pipeline(_net(), RUN_RECIPE, train=_data(), val=_data(1), out=out, quiet=True, resume=True)
    assert res.status == "completed"
    assert json.loads((out / "config.json").read_text())["fingerprint"]["model"]


def test_second_concurrent_resume_fails_at_once_and_crash_releases_lock(tmp_path):
    import subprocess
    import sys

    from prunekit.run.directory import Run
    from prunekit.run.pipeline import run_pipeline
    out = _start(tmp_path)
    with Run(out).locked():                               # another process's run in progress (a separate open)
        with pytest.raises(pk.RunError, match="in use by another prunekit process"):
            run_pipeline(_net(), RUN_RECIPE, train=_data(), val=_data(1), out=out, quiet=True, resume=True)
    code = ("import os, sys; from prunekit.run.directory import Run\n"
            f"ctx = Run({str(out)!r}).locked(); ctx.__enter__(); os._exit(9)\n")   # dies holding the lock
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 9
    res = run_pipeline(_net(), RUN_RECIPE, train=_data(), val=_data(1), out=out, quiet=True, resume=True)
    assert res.status == "completed"


# --------------------------------------------------------------------------------------------- property-based hunting

hypothesis = pytest.importorskip("hypothesis", reason="property-based tests need the hypothesis package")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HUNT = settings(max_examples=30, deadline=10_000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=12)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    r = pk.prune(small(), pk.Structured(ratio=0.5), example_inputs=X)
    d = pk.save(r, tmp_path_factory.mktemp("hunt") / "s")
    return d, r.model(X).detach()


def _mutate(d, data):
    name = data.draw(st.sampled_from(["plan.json", "model.safetensors", "prunekit.json"]))
    p = d / name
    kind = data.draw(st.sampled_from(["flip", "truncate", "delete", "json"] if name.endswith(".json")
                                     else ["flip", "truncate", "delete"]))
    raw = bytearray(p.read_bytes())
    if kind == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
        p.write_bytes(bytes(raw))
    elif kind == "truncate":
        p.write_bytes(bytes(raw[:data.draw(st.integers(0, len(raw) - 1))]))
    elif kind == "delete":
        p.unlink()
    else:                                      # replace one top-level field (or the whole file) by random JSON
        doc = json.loads(raw)
        key = data.draw(st.sampled_from(sorted(doc) + ["<whole>"]))
        value = data.draw(JSON)
        doc = value if key == "<whole>" else {**doc, key: value}
        p.write_text(json.dumps(doc))
    return name, kind


@settings(HUNT, max_examples=20)
@given(data=st.data(), verify=st.booleans())
def test_mutated_save_loads_exactly_or_fails_cleanly(saved, tmp_path_factory, data, verify):
    import shutil
    src, expected = saved
    d = tmp_path_factory.mktemp("m") / "s"
    shutil.copytree(src, d)
    name, kind = _mutate(d, data)
    try:
        model = pk.load(d, model=small(), verify=verify)
    except pk.PrunekitError as e:
        assert "\n" not in str(e)
        return
    out = model(X)
    # verified loads must be exact; unverified ones may load changed bytes but never from a changed plan shape
    if verify or name == "prunekit.json":
        assert torch.equal(out, expected), (name, kind)


RECIPE_TEXT = ("seed: 0\nbatch_size: 16\ntrain_limit: 64\nstages:\n"
               "  - evaluate: {metric: accuracy, max_drop: 0.05}\n"
               "  - prune: {type: Structured, ratio: 0.5, importance: l2, ignore: ['fc']}\n"
               "  - recover: {epochs: 1, lr: 0.001}\n")


@HUNT
@given(data=st.data())
def test_mutated_recipes_parse_or_fail_cleanly(tmp_path_factory, data):
    from prunekit.run.pipeline import Recipe, load_recipe
    raw = bytearray(RECIPE_TEXT.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "delete":
            del raw[i]
        else:
            b = data.draw(st.sampled_from(list(b"&*[]{}:-!'\"\n #0.5eE\xff\xfe") + [data.draw(st.integers(0, 255))]))
            raw[i:i + (op == "replace")] = bytes([b])
    p = tmp_path_factory.mktemp("r") / "r.yaml"
    p.write_bytes(bytes(raw))
    try:
        recipe = load_recipe(p)
    except pk.PrunekitError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(recipe, Recipe) and recipe.steps()


@HUNT
@given(doc=JSON)
def test_random_recipe_documents_fail_cleanly(doc):
    from prunekit.run.pipeline import Recipe, load_recipe
    try:
        recipe = load_recipe(doc if isinstance(doc, (dict, list)) else {"stages": doc})
    except pk.PrunekitError:
        return
    assert isinstance(recipe, Recipe)

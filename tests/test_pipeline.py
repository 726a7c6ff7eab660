"""Recipes run into run directories: checkpoints, metrics, resume bit-identical, divergence handling."""
import json

import pytest
import torch
import torch.nn as nn

import prunekit as pk
from prunekit.run.pipeline import Recipe, load_recipe, run_pipeline


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c1(x))).mean((2, 3)))


def batches(n=64, seed=0, bs=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


RECIPE = {"seed": 3, "calibration_batches": 2, "stages": [
    {"evaluate": {"metric": "accuracy"}},
    {"schedule": {"type": "Iterative", "steps": 2, "prune": {"type": "Structured", "ratio": 0.75,
                                                               "importance": {"type": "Taylor", "batches": 2}},
                  "recover": {"type": "Recover", "epochs": 2, "lr": 0.01, "checkpoint_every": 3}}},
    {"evaluate": {"metric": "accuracy"}}]}


def test_recipe_run_writes_run_directory(tmp_path):
    res = run_pipeline(Net(), RECIPE, train=batches(), val=batches(seed=1), out=tmp_path / "r", quiet=True)
    assert res.status == "completed"
    d = tmp_path / "r"
    for name in ("config.json", "config.yaml", "run.log", "metrics.json", "COMPLETE", "model/plan.json",
                 "model/model.safetensors", "checkpoints/latest.json"):
        assert (d / name).exists(), name
    assert json.loads((d / "config.json").read_text())["recipe"]["stages"][1]["schedule"]["steps"] == 2
    m = json.loads((d / "metrics.json").read_text())
    assert len(m["steps"]) == 2 and m["summary"]["rows"][0]["variant"] == "dense" and m["final"]["status"] == "completed"
    loaded = pk.load(d / "model", model=Net())
    x = batches()[0][0]
    assert torch.equal(loaded.eval()(x), res.model.eval()(x))
    assert loaded.c1.out_channels == 2                               # 8 -> 4 -> 2
    assert len(open(d / "run.log").read().splitlines()) >= 6


def test_resume_is_bit_identical(tmp_path):
    full = run_pipeline(Net(), RECIPE, train=batches(), val=batches(seed=1), out=tmp_path / "a", quiet=True)
    part = run_pipeline(Net(), RECIPE, train=batches(), val=batches(seed=1), out=tmp_path / "b", quiet=True,
                        stop_after=3)                                   # "killed" after prune, recover of step 1
    assert part.status == "interrupted"
    with pytest.raises(pk.RunError, match="resume"):
        run_pipeline(Net(), RECIPE, train=batches(), val=batches(seed=1), out=tmp_path / "b", quiet=True)
    done = run_pipeline(Net(), RECIPE, train=batches(), val=batches(seed=1), out=tmp_path / "b", quiet=True,
                        resume=True)
    a, b = full.model.state_dict(), done.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "resume at step 3" in (tmp_path / "b" / "run.log").read_text()


def test_resume_mid_recovery_is_bit_identical(tmp_path):
    """Kill inside a recover step: recover() resumes from its own checkpoint in recover-NNN/."""
    recipe = {"seed": 1, "stages": [{"prune": {"type": "Structured", "ratio": 0.5}},
                                    {"recover": {"epochs": 2, "lr": 0.01, "checkpoint_every": 2}}]}
    full = run_pipeline(Net(), recipe, train=batches(), val=batches(seed=1), out=tmp_path / "a", quiet=True)

    class Kill(Exception):
        pass
    import importlib
    loop = importlib.import_module("prunekit.recover.loop")     # pk.recover is the function, not the package
    orig = loop._Loop._save
    calls = {"n": 0}

    def save_then_die(self):
        orig(self)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Kill()
    loop._Loop._save = save_then_die
    try:
        with pytest.raises(Kill):
            run_pipeline(Net(), recipe, train=batches(), val=batches(seed=1), out=tmp_path / "b", quiet=True)
    finally:
        loop._Loop._save = orig
    done = run_pipeline(Net(), recipe, train=batches(), val=batches(seed=1), out=tmp_path / "b", quiet=True,
                        resume=True)
    a, b = full.model.state_dict(), done.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_recovery_stops_and_keeps_last_checkpoint(tmp_path):
    bad = batches()
    bad[1] = (torch.full_like(bad[1][0], float("nan")), bad[1][1])
    recipe = {"stages": [{"prune": {"type": "Structured", "ratio": 0.5}},
                         {"recover": {"epochs": 1, "lr": 0.01, "shuffle": False}}]}
    res = run_pipeline(Net(), recipe, train=bad, val=batches(seed=1), out=tmp_path / "r", quiet=True)
    assert res.status == "diverged" and "non-finite" in res.message and "last good checkpoint" in res.message
    latest = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 1                                        # the prune step, nothing after it
    assert res.model.c1.out_channels == 4 and all(torch.isfinite(p).all() for p in res.model.parameters())
    assert not (tmp_path / "r" / "COMPLETE").exists()


def test_recipe_errors_name_the_stage_and_closest_key():
    with pytest.raises(pk.ConfigError, match="did you mean 'ratio'"):
        load_recipe({"stages": [{"prune": {"type": "Structured", "ratoi": 0.5}}]})
    with pytest.raises(pk.ConfigError, match="did you mean 'prune'"):
        load_recipe({"stages": [{"prun": {"type": "Structured"}}]})
    with pytest.raises(pk.ConfigError, match=r"stages\[0\].*allocation"):
        load_recipe({"stages": [{"prune": {"type": "Structured"}, "allocation": "magic"}]})
    with pytest.raises(pk.ConfigError, match="Recover.epochs"):
        load_recipe({"stages": [{"recover": {"epochs": "two"}}]})
    with pytest.raises(pk.ConfigError, match="non-empty"):
        Recipe(stages=[])


def test_sensitivity_allocation_stage_runs(tmp_path):
    recipe = {"calibration_batches": 2, "stages": [{"prune": {"type": "Structured", "ratio": 0.5},
                                                    "allocation": "sensitivity"}]}
    res = run_pipeline(Net(), recipe, train=batches(), val=batches(seed=1), out=tmp_path / "r", quiet=True)
    assert res.status == "completed" and res.model.c1.out_channels < 8


def test_builtin_recipes_parse():
    import pathlib

    import prunekit
    files = sorted((pathlib.Path(prunekit.__file__).parent / "recipes").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        r = load_recipe(f)
        assert r.steps(), f


def test_resume_restores_masks_of_the_last_good_model(tmp_path):
    """A gate fails after a resume: the model rolled back to is the saved last_good/ (masks baked on disk),
    with its masks re-installed, exactly as in the uninterrupted run (where it never left memory)."""
    from torch.nn.utils import parametrize
    recipe = {"seed": 2, "calibration_batches": 2, "stages": [
        {"prune": {"type": "Sparse", "sparsity": 0.3, "method": "wanda"}},
        {"evaluate": {"metric": "accuracy", "max_drop": 1.0}},             # always passes: last_good/ written
        {"recover": {"epochs": 1, "lr": 0.01}},
        {"prune": {"type": "Sparse", "sparsity": 0.99, "method": "magnitude"}},
        {"evaluate": {"metric": "accuracy", "max_drop": 0.0}}]}             # fails: roll back
    import copy
    trained = pk.recover(Net(), data=batches(n=256), config=pk.Recover(epochs=8, lr=0.05, loss="task"), quiet=True)
    full = run_pipeline(copy.deepcopy(trained), recipe, train=batches(), val=batches(seed=1), out=tmp_path / "a",
                        quiet=True)
    assert full.status == "gate_failed"
    run_pipeline(copy.deepcopy(trained), recipe, train=batches(), val=batches(seed=1), out=tmp_path / "b", quiet=True,
                 stop_after=3)
    done = run_pipeline(copy.deepcopy(trained), recipe, train=batches(), val=batches(seed=1), out=tmp_path / "b",
                        quiet=True, resume=True)
    assert done.status == "gate_failed"
    for m in (full.model, done.model):
        assert parametrize.is_parametrized(m.c1, "weight") and parametrize.is_parametrized(m.fc, "weight")
    assert torch.equal(full.model.c1.parametrizations.weight[0].mask, done.model.c1.parametrizations.weight[0].mask)
    a, b = full.model.state_dict(), done.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert 0.2 < float((done.model.c1.weight == 0).float().mean()) < 0.35      # the 30% step (2 of 9 per row)

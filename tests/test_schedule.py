"""Schedules: the step arithmetic, plan composition, masks accumulating, the quality gate."""

import pytest
import torch
import torch.nn as nn

import prunekit as pk
from prunekit.plan import compose_plans
from prunekit.run import executor as EX
from prunekit.run import schedule as SC
from prunekit.sparse import Sparse
from prunekit.structured.config import MACs, Structured


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_cubic_sparsity_hand_values():
    assert SC.cubic_sparsity(0, 4, 0.8) == 0.0
    assert SC.cubic_sparsity(4, 4, 0.8) == pytest.approx(0.8)
    assert SC.cubic_sparsity(2, 4, 0.8) == pytest.approx(0.8 - 0.8 * 0.125)      # (1 - 1/2)^3
    assert SC.cubic_sparsity(1, 2, 0.5, initial=0.1) == pytest.approx(0.5 - 0.4 * 0.125)
    with pytest.raises(ValueError):
        SC.cubic_sparsity(5, 4, 0.8)


def test_geometric_steps_compose_to_the_final_ratio():
    r = SC.per_step_ratio(0.75, 2)
    assert r == pytest.approx(0.5)
    assert SC.cumulative_ratio(0.75, 2, 1) == pytest.approx(0.5)
    cfg = SC.step_config(Structured(target=MACs(ratio=0.75)), 2, 1)
    assert cfg.target.ratio == pytest.approx(0.5)
    assert SC.step_config(Structured(ratio={"a": 0.75}), 2, 2).ratio == {"a": pytest.approx(0.5)}
    assert SC.step_config(Sparse(sparsity=0.75), 2, 1).sparsity == pytest.approx(0.5)
    from prunekit.structured.config import Latency
    assert SC.step_config(Structured(target=Latency(speedup=4.0)), 2, 1).target.speedup == pytest.approx(2.0)


def test_composed_plan_replays_two_prunings_on_the_original():
    m, x = mlp(), torch.randn(2, 4)
    r1 = pk.prune(m, Structured(ratio=0.5), example_inputs=x)
    r2 = pk.prune(r1.model, Structured(ratio=0.5), example_inputs=x)
    plan = compose_plans(compose_plans(None, r1.plan), r2.plan)
    rebuilt = EX.rebuild(m, plan, [])                       # fresh original + plan, original weights sliced
    assert torch.equal(rebuilt(x), r2.model(x))


def test_iterative_reaches_ratio_and_gradual_masks_only_grow():
    m = mlp()
    out = EX.run_schedule(m, SC.Iterative(prune=Structured(ratio=0.75), steps=2), example_inputs=torch.randn(1, 4))
    assert out.status == "completed"
    assert out.model[0].out_features == 4                   # 16 -> 8 -> 4
    g = EX.run_schedule(m, SC.Gradual(sparsity=0.8, steps=3), example_inputs=torch.randn(1, 4), train=data())
    sparsities = [h["sparsity"] for h in g.history if h["kind"] == "prune"]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.8, abs=0.02)
    masks = pk.sparse.masks(g.model)
    assert masks and all(0.7 < 1 - mk.float().mean() < 0.9 for mk in masks.values())


def test_gate_failure_keeps_last_good_model():
    m = mlp()
    val = [(x, m(x).argmax(1)) for x, _ in data(64, seed=1)]        # dense accuracy is exactly 1.0
    stages = [Structured(ratio=0.5), SC.EvalStage(max_drop=1.0), Structured(ratio=0.875), SC.EvalStage(max_drop=0.0)]
    out = EX.run_schedule(m, stages, example_inputs=torch.randn(1, 4), val=val)
    assert out.status == "gate_failed" and "max_drop 0.0" in out.message
    assert out.model[0].out_features == 8                            # the model that passed the first gate
    assert [h.get("gate") for h in out.history if h["kind"] == "evaluate"] == ["passed", "failed"]
    rebuilt = EX.rebuild(m, out.plan, [])                            # its plan still rebuilds its shapes
    assert rebuilt[0].out_features == 8
    ok = EX.run_schedule(m, SC.Iterative(prune=Structured(ratio=0.5), steps=2, max_drop=1.0),
                         example_inputs=torch.randn(1, 4), val=val)
    assert ok.status == "completed" and [h["gate"] for h in ok.history if h["kind"] == "evaluate"] == ["passed"] * 2


def test_gate_failure_on_first_step_returns_dense_copy():
    m = mlp()                                   # perfect on its own labels -> cutting 15 of 16 units drops
    val = [(x, m(x).argmax(1)) for x, _ in data(64, seed=2)]
    out = EX.run_schedule(m, SC.Iterative(prune=Structured(ratio=0.9375, importance="random"), steps=1,
                                          max_drop=0.0), example_inputs=torch.randn(1, 4), val=val)
    assert out.status == "gate_failed" and out.plan is None
    x = torch.randn(5, 4)
    assert torch.equal(out.model(x), m(x)) and out.model is not m


def test_schedule_config_errors():
    with pytest.raises(pk.ConfigError, match="Iterative.prune"):
        SC.Iterative(prune=None)
    with pytest.raises(pk.ConfigError, match="Gradual.initial_sparsity"):
        SC.Gradual(sparsity=0.2, initial_sparsity=0.5)
    with pytest.raises(pk.ConfigError, match="Iterative.steps"):
        SC.Iterative(prune=Structured(), steps=0)

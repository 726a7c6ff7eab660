"""Latency-target logic with an injected, deterministic timer (real timings belong in benchmarks/)."""

import pytest
import torch
import torch.nn as nn
from helpers import GroupedExperts

import prunekit as pk
from prunekit.errors import ConfigError
from prunekit.structured import latency as L
from prunekit.structured.allocate import group_scores
from prunekit.structured.config import Structured
from prunekit.structured.cut import remove_units


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def fake_timer(models, inputs):
    """'Latency' = 1 us per parameter + a fixed 2 ms overhead: monotone in pruning, exactly reproducible."""
    return {k: 2e-3 + 1e-6 * sum(p.numel() for p in m.parameters()) for k, m in models.items()}


def test_bisect_count_finds_smallest_count_reaching_target():
    speed = lambda k: 1.0 + k / 10                     # count k -> speedup
    c, s, hist, ok = L.bisect_count(speed, 100, target=3.0, tolerance=0.01, max_evals=20)
    assert ok and c == 20 and s == pytest.approx(3.0)
    c, s, hist, ok = L.bisect_count(speed, 10, target=3.0, tolerance=0.01, max_evals=20)
    assert not ok and c == 10 and s == pytest.approx(2.0) and len(hist) == 1


def test_unit_priorities_prefer_costly_groups_and_removal_respects_caps():
    scores = {0: torch.tensor([1.0, 1.0]), 1: torch.tensor([1.0, 1.0])}
    order = L.unit_priorities(scores, {0: 1.0, 1: 4.0}, {0: 2, 1: 2}, cost_weight=1.0)
    assert [gi for _, gi, _ in order[:2]] == [1, 1]            # same importance, group 1 saves 4x more time
    assert [gi for _, gi, _ in L.unit_priorities(scores, {0: 1.0, 1: 4.0}, {0: 2, 1: 2}, 0.0)[:2]] == [0, 0]
    rm = L.removal_from_order(order, 3, caps={0: 1, 1: 1}, sizes={0: 2, 1: 2})
    assert int(rm[0].sum()) == 1 and int(rm[1].sum()) == 1     # caps stop group 1 at one unit


@pytest.mark.parametrize("allocation", ["cost", "uniform"])
def test_allocate_for_latency_meets_target_with_fake_timer(allocation):
    m, x = cnn(), torch.randn(1, 3, 8, 8)
    graph = pk.DependencyGraph(m, x)
    cfg = Structured(target=L.Latency(speedup=1.5, allocation=allocation, tolerance=0.02, max_evals=20))
    sc = group_scores(graph, cfg, {**graph.params, **graph.buffers})
    removed, info = L.allocate_for_latency(m, graph, sc, cfg, x, timer=fake_timer)
    assert info["latency_reached"] and info["latency_requested"] == 1.5
    assert abs(info["latency_achieved"] - 1.5) <= 0.1 * 1.5
    pruned, _, _ = remove_units(m, graph, removed)
    t = fake_timer({"d": m, "p": pruned}, None)
    assert t["d"] / t["p"] == pytest.approx(info["latency_achieved"])
    if allocation == "cost":
        assert set(info["latency_costs_ms_per_unit"]) == {str(g.index) for g in graph.groups}


def test_unreachable_target_warns_and_keeps_most_pruned():
    m, x = cnn(), torch.randn(1, 3, 8, 8)
    cfg = Structured(target=L.Latency(speedup=50.0, max_ratio=0.5))
    graph = pk.DependencyGraph(m, x)
    sc = group_scores(graph, cfg, {**graph.params, **graph.buffers})
    with pytest.warns(RuntimeWarning, match="not reached"):
        removed, info = L.allocate_for_latency(m, graph, sc, cfg, x, timer=fake_timer)
    assert not info["latency_reached"] and "max_ratio" in info["latency_message"]
    for gi, mask in removed.items():                           # every group cut to its 50% cap
        assert int(mask.sum()) == graph.groups[gi].n_units // 2


def test_latency_through_pk_prune(monkeypatch):
    monkeypatch.setattr(L, "measured_timer", lambda *a, **k: fake_timer)
    m, x = cnn(), torch.randn(1, 3, 8, 8)
    res = pk.prune(m, Structured(target=L.Latency(speedup=1.3)), example_inputs=x)
    assert res.stats["latency_reached"] and abs(res.stats["latency_achieved"] - 1.3) < 0.13


@pytest.mark.parametrize("kw,field", [({"speedup": 0.5}, "speedup"), ({"batch_size": 0}, "batch_size"),
                                      ({"allocation": "greedy"}, "allocation"), ({"max_ratio": 1.5}, "max_ratio"),
                                      ({"speedup": "2x"}, "speedup")])
def test_latency_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"Latency.{field}"):
        L.Latency(**kw)


def test_latency_target_keeps_stacked_expert_rows_16_byte_aligned(monkeypatch):
    """The latency search rounds kept widths like the ratio path: a stacked expert width the grouped kernel
    reads keeps a multiple of 4 float32 channels (16-byte rows), even with round_to=1, and the result runs."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    monkeypatch.setattr(L, "measured_timer", lambda *a, **k: fake_timer)
    m, x = GroupedExperts().eval(), torch.randn(2, 6, 8)
    res = pk.prune(m, Structured(target=L.Latency(speedup=1.4, max_ratio=0.6)), example_inputs=x)
    width = res.model.w1.shape[2]
    assert width < 32 and width % 4 == 0 and res.model.w2.shape[1] == width
    assert torch.isfinite(res.model(x)).all()

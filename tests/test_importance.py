"""Importance criteria: hand-computed cases for each pure function, and the callable configs end to end."""
import pytest
import torch
import torch.nn as nn

import prunekit as pk
from prunekit.structured import criteria as C
from prunekit.structured import importance as I
from prunekit.structured import statistics as ST
from prunekit.structured import sensitivity as S
from prunekit.structured.config import Structured


class TinyConvBN(nn.Module):
    """conv(1->4) - BN - ReLU - conv(4->2): one prunable group of 4 channels."""
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x)))).mean((2, 3))


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3, bias=False)
        self.b = nn.Linear(3, 1, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def _group(model, x):
    g = pk.DependencyGraph(model, x)
    assert len(g.groups) == 1
    return g, g.groups[0]


def test_aggregate_sum_mean_max():
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])
    assert C.aggregate([a, b], "sum").tolist() == [4.0, 6.0]
    assert C.aggregate([a, b], "mean").tolist() == [2.0, 3.0]
    assert C.aggregate([a, b], "max").tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="agg"):
        C.aggregate([a], "median")


def test_magnitude_combines_producer_and_consumer_slices():
    m = TinyMLP()
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]))
        m.b.weight.copy_(torch.tensor([[1.0, 1.0, 0.0]]))
    graph, g = _group(m, torch.randn(1, 2))
    tensors = {**graph.params, **graph.buffers}
    # l1, no normalization: rows of a = [1, 2, 7], columns of b = [1, 1, 0]
    assert I.Magnitude(p=1, norm=None)(g, tensors).tolist() == [2.0, 3.0, 7.0]
    assert I.Magnitude(p=1, norm=None, agg="max")(g, tensors).tolist() == [1.0, 2.0, 7.0]
    # l2 with per-member mean normalization: a -> [1, 4, 25] / 10, b -> [1, 1, 0] / (2/3)
    s = I.Magnitude(p=2, norm="mean")(g, tensors)
    assert torch.allclose(s, torch.tensor([0.1 + 1.5, 0.4 + 1.5, 2.5], dtype=torch.float64))


def test_bn_scale_is_abs_gamma_and_falls_back_without_bn():
    m = TinyConvBN()
    with torch.no_grad():
        m.bn.weight.copy_(torch.tensor([0.5, -2.0, 0.1, 1.0]))
    graph, g = _group(m, torch.randn(1, 1, 2, 2))
    imp = I.BNScale()
    imp.prepare(m, graph)
    assert imp(g, {**graph.params, **graph.buffers}).tolist() == pytest.approx([0.5, 2.0, 0.1, 1.0])
    mlp = TinyMLP()
    graph2, g2 = _group(mlp, torch.randn(1, 2))
    imp2 = I.BNScale()
    imp2.prepare(mlp, graph2)
    with pytest.warns(UserWarning, match="no BatchNorm"):
        s = imp2(g2, {**graph2.params})
    assert s.shape == (3,) and imp2.fallbacks == [g2.index]


def test_apoz_and_activation_stats_hand_case():
    out = torch.tensor([[[1.0, -2.0]], [[0.0, 3.0]]]).reshape(2, 2)     # (B=2, C=2), channels in dim 1
    s_abs, s_zero, n = ST.activation_stats(out, 1)
    assert s_abs.tolist() == [1.0, 5.0] and s_zero.tolist() == [1.0, 1.0] and n == 2
    assert C.apoz_to_importance(torch.tensor([0.25, 1.0])).tolist() == [0.75, 0.0]


def test_activation_importance_ranks_dead_channel_last():
    m = TinyConvBN().eval()
    with torch.no_grad():
        m.c1.weight.fill_(1.0)
        m.bn.bias.copy_(torch.tensor([0.0, -100.0, 0.0, 0.0]))     # channel 1 is always <= 0 after BN
    x = torch.rand(8, 1, 3, 3)
    graph, g = _group(m, x[:1])
    for kind in ("apoz", "mean"):
        imp = I.Activation(kind=kind, data=[x, x], norm=None)
        imp.prepare(m, graph)
        s = imp(g, {**graph.params})
        assert int(torch.argmin(s)) == 1 if kind == "apoz" else s.shape == (4,)
    apoz = ST.collect_activations(m, [x], ["bn"])["bn"]["apoz"]
    assert apoz[1] == 1.0 and apoz[0] == 0.0


def test_taylor_matches_hand_gradient():
    # out = b(a(x)), loss = out (sum); dL/da.W[i, j] = b.W[0, i] * x[j]; channel i: |sum_j a.W[i,j] * b_i * x_j|
    m = TinyMLP()
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
        m.b.weight.copy_(torch.tensor([[1.0, 3.0, 2.0]]))
    x = torch.tensor([[1.0, 1.0]])
    vals = ST.accumulate_taylor(m, [x], [("a.weight", 0), ("b.weight", 1)], loss_fn=lambda out, t: out.sum())
    # producer: |a_i . x * b_i| = [1, 6, 0]; consumer slice b_i: |b_i * (a_i . x)| = [1, 6, 0]
    assert vals[("a.weight", 0)].tolist() == pytest.approx([1.0, 6.0, 0.0])
    assert vals[("b.weight", 1)].tolist() == pytest.approx([1.0, 6.0, 0.0])
    assert m.a.weight.grad is None                      # calibration leaves .grad as it found it


def test_taylor_through_structured_prune_keeps_best_channel():
    m = TinyMLP()
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
        m.b.weight.copy_(torch.tensor([[1.0, 3.0, 2.0]]))
    x = torch.tensor([[1.0, 1.0]])
    graph = pk.DependencyGraph(m, x)
    imp = I.prepare(I.Taylor(), m, graph, data=[x], loss_fn=lambda out, t: out.sum())
    res = pk.prune(m, Structured(ratio=0.67, importance=imp), example_inputs=x, graph=graph)
    assert res.plan.kept["a.weight"]["0"] == [1]                  # the channel with Taylor score 6


def test_taylor_without_prepare_or_data_says_what_to_do():
    m = TinyMLP()
    graph, g = _group(m, torch.randn(1, 2))
    with pytest.raises(RuntimeError, match="prepare"):
        I.Taylor()(g, graph.params)
    with pytest.raises(ValueError, match="calibration batches"):
        I.Taylor().prepare(m, graph)


def test_inverse_sensitivity_keeps_budget_and_order():
    r = S.inverse_sensitivity_ratios([0.0, 1.0, 4.0], [10, 10, 20], ratio=0.5, max_ratio=0.9)
    removed = sum(ri * n for ri, n in zip(r, [10, 10, 20]))
    assert removed == pytest.approx(20.0, rel=1e-6)
    assert r[0] == pytest.approx(0.9) and r[0] > r[1] > r[2]


def test_sensitivity_ratios_feed_structured_ratio_dict():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        m[2].weight[:, :] *= 0.01                    # group 2 (second hidden layer) hardly matters...
        m[4].weight[:, :] *= 0.01
    x = torch.randn(32, 4)
    y = torch.randint(0, 3, (32,))
    ratios = S.sensitivity_ratios(m, x[:1], [(x, y)], ratio=0.5, batches=1)
    assert len(ratios) == 2 and all(0 <= v <= 0.9 for v in ratios.values())
    res = pk.prune(m, Structured(ratio=ratios), example_inputs=x[:1])
    assert res.stats["params_after"] < res.stats["params_before"]


def test_prepare_is_idempotent_per_graph():
    m = TinyMLP()
    x = torch.tensor([[1.0, 1.0]])
    graph = pk.DependencyGraph(m, x)
    calls = []
    imp = I.Taylor(data=[x], loss_fn=lambda out, t: calls.append(1) or out.sum())
    imp.prepare(m, graph)
    imp.prepare(m, graph)                            # structured pruning may call it again: no second pass
    assert len(calls) == 1
    imp.prepare(m, pk.DependencyGraph(m, x))         # a re-traced graph recalibrates
    assert len(calls) == 2

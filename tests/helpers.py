"""Shared invariant checks, used by the case tables (PEFT style: tiny models, one check per invariant)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit as pk
from prunekit.structured.cut import cut_valid, run_model


def outputs(model, x):
    out = run_model(model.eval(), x)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    if isinstance(out, dict):
        return [o for o in out.values() if isinstance(o, torch.Tensor)]
    return [out]


def assert_close_rel(a, b, rtol=1e-5, what=""):
    for x, y in zip(a, b):
        assert x.shape == y.shape, f"{what}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        scale = y.abs().max().clamp_min(1e-6)
        err = (x - y).abs().max() / scale
        assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol}"


def check_ratio_zero_identical(model, x):
    r = pk.prune(model, pk.Structured(ratio=0.0), example_inputs=x)
    for a, b in zip(outputs(model, x), outputs(r.model, x)):
        assert torch.equal(a, b), "ratio=0 must give bit-identical outputs"
    assert pk.count_params(r.model) == pk.count_params(model)


def check_prunes(model, x, ratio=0.5, **kw):
    before = outputs(model, x)
    p0, m0 = pk.count_params(model), pk.count_macs(model, x)
    r = pk.prune(model, pk.Structured(ratio=ratio, **kw), example_inputs=x)
    after = outputs(r.model, x)
    for a, b in zip(before, after):
        assert a.shape == b.shape
        assert torch.isfinite(b).all()
    p1, m1 = pk.count_params(r.model), pk.count_macs(r.model, x)
    assert p1 < p0, f"params not reduced: {p0} -> {p1}"
    assert m1 < m0, f"MACs not reduced: {m0} -> {m1}"
    # the analytic MAC model used for targets agrees with a recount of the pruned model
    assert abs(r.stats["macs_after"] - m1) <= 0.02 * m1 + 1000, (r.stats["macs_after"], m1)
    # the original model is untouched
    for a, b in zip(before, outputs(model, x)):
        assert torch.equal(a, b)
    return r


def _producer_side(graph, member):
    """Members whose zeroing silences a channel: everything but the input side of Linear/Conv weights."""
    if member.name not in graph.params:
        return False                       # buffers (BN running stats) need no zeroing
    return not graph.is_consumer(member)


def check_zero_channel_equivalence(model, x, fraction=0.25, seed=0, rtol=1e-5):
    """Zero the weights producing some channels, prune exactly those channels: outputs must not change."""
    model = copy.deepcopy(model).eval()
    chosen = {}

    def choose(graph):
        gen = torch.Generator().manual_seed(seed)
        removed = {}
        with torch.no_grad():
            for g in graph.groups:
                n = int(g.n_units * fraction)
                if not g.exact or n == 0 or n >= g.n_units:
                    continue
                mask = torch.zeros(g.n_units, dtype=torch.bool)
                mask[torch.randperm(g.n_units, generator=gen)[:n]] = True
                removed[g.index] = mask
                for m in g.members:
                    if _producer_side(graph, m):
                        graph.params[m.name].index_fill_(m.dim, m.pos[mask[m.unit]], 0.0)
        chosen["n"] = len(removed)
        return removed

    cut = cut_valid(model, x, choose)
    assert chosen["n"], "no exact group to test"
    assert pk.count_params(cut.pruned) < pk.count_params(model)
    assert_close_rel(outputs(cut.pruned, x), outputs(model, x), rtol=rtol, what="zero-channel equivalence")
    return chosen["n"]


def check_save_load(result, fresh, x, tmp_path):
    pk.save(result, tmp_path)
    loaded = pk.load(tmp_path, model=fresh)
    for a, b in zip(outputs(result.model, x), outputs(loaded, x)):
        assert torch.equal(a, b), "save -> load must be bit-identical"
    sd1, sd2 = result.model.state_dict(), loaded.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k


class TwoLinear(nn.Module):
    """Linear(6, 8) -> ReLU -> Linear(8, 3): the smallest model with one prunable group."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class GroupedExperts(nn.Module):
    """Mixture of experts through torch._grouped_mm: tokens (T, K) x expert weights (E, K, N)."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.w1 = nn.Parameter(torch.randn(2, 16, 32) * 0.2)
        self.w2 = nn.Parameter(torch.randn(2, 32, 16) * 0.2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        t = self.inp(x).flatten(0, 1)
        offs = torch.tensor([5, t.shape[0]], dtype=torch.int32)
        h = F.relu(torch._grouped_mm(t, self.w1, offs=offs))
        return self.head(torch._grouped_mm(h, self.w2, offs=offs))

"""Verification inside pk.prune: the pruned model must compute what the dense model computes with the removed
slices zeroed, or the prune raises naming the first diverging module and the ignore= that avoids it."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit as pk
from prunekit.errors import VerificationError
from prunekit.structured.cut import cut_valid
from prunekit.structured.verify import relative_difference, removed_slices_zeroed, tensors_of


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
                         nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.Sigmoid(),
                         nn.Conv2d(12, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


class ScaleByWidth(nn.Module):
    """Reads the channel count at run time, like RAFT's correlation divided by sqrt(C)."""

    def forward(self, x):
        return x / math.sqrt(x.shape[1])


class RuntimeWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.scale = ScaleByWidth()
        self.b = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.scale(torch.relu(self.a(x))))


class LabelsFromScores(nn.Module):
    """A detector-like model whose outputs are post-processed: labels = argmax over classes. Removing classes
    does not change any output shape, only the answer (FCOS cut from 91 to 64 classes)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.cls_logits = nn.Conv2d(8, 10, 1)

    def forward(self, x):
        scores = torch.sigmoid(self.cls_logits(torch.relu(self.body(x))))     # (N, K, H, W)
        best, labels = scores.flatten(2).max(1)
        return best, labels


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same_state(m, snap):
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


def test_exact_cut_is_verified_and_reported():
    m, x = _cnn(), torch.randn(2, 3, 12, 12)
    snap = _snapshot(m)
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    v = r.stats["verification"]
    assert v["mode"] == "exact" and v["max_rel_diff"] <= v["tolerance"] and v["modules_compared"] > 0
    assert "verified exact" in r.summary()
    assert _same_state(m, snap), "the dense model must be restored bit-identically after verification"


def test_runtime_size_raises_naming_the_module_and_ignore_avoids_it():
    m, x = RuntimeWidth().eval(), torch.randn(1, 3, 8, 8)
    snap = _snapshot(m)
    with pytest.raises(VerificationError, match=r"'scale'.*ignore=\['scale'\]") as e:
        pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    assert "\n" not in str(e.value) and isinstance(e.value, pk.PrunekitError)
    assert _same_state(m, snap), "a failed verification must leave the model as it was"
    r = pk.prune(m, pk.Structured(ratio=0.5, ignore=["scale"]), example_inputs=x)
    assert r.stats["verification"]["mode"] == "exact"


def test_verify_false_switches_it_off():
    m, x = RuntimeWidth().eval(), torch.randn(1, 3, 8, 8)
    r = pk.prune(m, pk.Structured(ratio=0.5, verify=False), example_inputs=x)
    assert r.stats["verification"]["mode"] == "off" and "verification off" in r.summary()
    assert r.model.a.out_channels == 8
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x, verify=False)
    assert r.stats["verification"]["mode"] == "off"
    with pytest.raises(pk.ConfigError, match="verify"):
        pk.Structured(verify="no")


def test_post_processed_labels_cannot_silently_change():
    """max(1) over the classes returns positions as labels: the graph pins the class dim (positions.py), the
    body still prunes, and the labels equal those of the dense model with the removed channels zeroed."""
    m, x = LabelsFromScores().eval(), torch.randn(1, 3, 6, 6)
    r = pk.prune(m, pk.Structured(ratio=0.4), example_inputs=x)
    assert r.model.cls_logits.out_channels == 10 and r.model.body.out_channels < 8
    assert r.stats["verification"]["mode"] == "exact"
    with removed_slices_zeroed(m, r.plan.kept_by_dim()), torch.no_grad():
        dense = tensors_of(m(x))
    for a, b in zip(dense, tensors_of(r.model(x))):
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ratio_zero_bit_identical():
    m, x = _cnn(), torch.randn(2, 3, 12, 12)
    r = pk.prune(m, pk.Structured(ratio=0.0), example_inputs=x)
    for a, b in zip(tensors_of(m(x)), tensors_of(r.model(x))):
        assert torch.equal(a, b)
    assert r.stats["verification"]["max_rel_diff"] == 0.0


def test_normalization_over_pruned_channels_is_approximate_not_raised():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3)).eval()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=torch.randn(4, 6))
    v = r.stats["verification"]
    assert v["mode"] == "approximate" and v["approximate_modules"] == ["2"] and v["max_approx_rel_diff"] > 0
    assert v["max_module_rel_diff"] <= v["tolerance"], "the Linear before the LayerNorm is still compared exactly"
    assert "approximate" in r.summary() and "(2;" in r.summary()


class ScaledThenNormed(nn.Module):
    """A size read at run time *upstream* of a LayerNorm over the pruned channels: the norm hides the scale
    in the outputs, so only an exact check of the modules before the norm can see it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.scale = ScaleByWidth()
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.norm(self.scale(F.gelu(self.inp(x)).unsqueeze(-1)).squeeze(-1)))


def test_approximation_is_per_module_not_per_cut():
    """One LayerNorm over pruned channels makes only what is computed from it approximate: the runtime-size
    bug before it is still caught and named (a per-cut 'approximate' let it pass)."""
    torch.manual_seed(0)
    m, x = ScaledThenNormed().eval(), torch.randn(4, 6)
    with pytest.raises(VerificationError, match=r"'scale'.*ignore=\['scale'\]"):
        pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    r = pk.prune(m, pk.Structured(ratio=0.5, ignore=["scale"]), example_inputs=x)   # pins that width
    assert r.stats["verification"]["mode"] == "exact"


def test_zeroed_slices_invariants():
    """Inside the context the removed slices are exactly zero and the rest untouched; the zeroed dense model
    computes what the cut model computes; afterwards (also after an exception) every value is bit-identical."""
    m, x = _cnn(), torch.randn(2, 3, 12, 12)
    snap = _snapshot(m)

    def choose(g):
        return {gr.index: torch.arange(gr.n_units) % 3 == 0 for gr in g.groups}

    cut = cut_valid(m, x, choose)
    assert cut.kept
    params = dict(m.named_parameters())
    with removed_slices_zeroed(m, cut.kept), torch.no_grad():
        for name, dims in cut.kept.items():
            if name not in params:
                continue
            p = params[name]
            gone = torch.zeros(p.shape, dtype=torch.bool)
            for dim, keep in dims.items():
                drop = torch.ones(p.shape[dim], dtype=torch.bool)
                drop[keep] = False
                shape = [1] * p.dim()
                shape[dim] = -1
                gone |= drop.view(shape)
            assert gone.any() and p[gone].eq(0).all(), name
            assert torch.equal(p[~gone], snap[name][~gone]), name
        dense = tensors_of(m(x))
    pruned = tensors_of(cut.pruned(x))
    for a, b in zip(dense, pruned):
        assert relative_difference(a, b) <= 1e-5
    assert _same_state(m, snap)
    with pytest.raises(RuntimeError, match="boom"):
        with removed_slices_zeroed(m, cut.kept):
            raise RuntimeError("boom")
    assert _same_state(m, snap)


def test_relative_difference_aligns_removed_positions():
    dense = torch.tensor([[1.0, 0.0, 2.0, 0.0, 3.0]])
    assert relative_difference(dense, torch.tensor([[1.0, 2.0, 3.0]])) == 0.0
    assert relative_difference(dense, torch.tensor([[1.0, 2.0, 3.3]])) == pytest.approx(0.1)
    assert relative_difference(dense, torch.tensor([[1.0, 2.0]])) is None      # cannot tell which were kept


def test_verification_of_a_model_in_train_mode_with_dropout():
    """A model left in train mode (dropout active) is verified in eval mode on both sides, as the dense
    reference is: the cut is exact, not a 'mismatch' made of dropout noise, and the mode is restored."""
    import prunekit as pk
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).train()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=torch.randn(16, 8))
    assert m.training and r.model.training
    assert r.stats["verification"]["mode"] == "exact"


class EmptyDetector(nn.Module):
    """FCOS-like post-processing: scores over (positions x classes) flattened, kept above a threshold, top-k,
    then position -> (anchor, label) by // and %. With these weights no score passes the threshold, so every
    final output is empty whatever the cut does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 16, 3, padding=1)
        self.cls_logits = nn.Conv2d(16, 10, 1)
        nn.init.constant_(self.cls_logits.bias, -8.0)        # sigmoid ~ 3e-4: below the threshold

    def forward(self, x):
        logits = self.cls_logits(torch.relu(self.body(x)))               # (1, K, H, W)
        k = logits.shape[1]
        flat = logits.permute(0, 2, 3, 1).sigmoid().flatten()
        keep = flat > 0.5
        scores, idx = flat[keep], torch.where(keep)[0]
        scores, order = scores.topk(min(3, scores.numel()))
        idx = idx[order]
        return scores, idx // k, idx % k


def test_raw_head_outputs_catch_a_wrong_cut_that_final_outputs_cannot(monkeypatch):
    """A planted graph bug (boolean-mask indexing and where(cond) drop their labels without pinning anything)
    lets the class dim be cut. The final outputs are empty in both models, so only the
    comparison of the tensor feeding the data-dependent ops (the raw class scores) can see it."""
    from prunekit.graph import rules
    from prunekit.structured import watch
    m, x = EmptyDetector().eval(), torch.randn(1, 3, 8, 8)
    assert all(t.numel() == 0 for t in m(x))
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)       # the real graph: classes pinned
    assert r.model.cls_logits.out_channels == 10 and r.stats["verification"]["data_inputs_compared"] > 0

    def forgetful(tr, args, kwargs, out):       # the planted bug: an op that reads positions drops its labels
        for o in tensors_of(out):
            tr.set(o, [])

    monkeypatch.setitem(rules.RULES, "__getitem__", forgetful)
    monkeypatch.setitem(rules.RULES, "where", forgetful)
    with pytest.raises(VerificationError, match=r"data-dependent op '__getitem__'.*ignore=\['cls_logits'\]"):
        pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    monkeypatch.setattr(watch, "is_data_dependent", lambda *a: False)    # compare final + module outputs only
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    assert r.model.cls_logits.out_channels < 10, "the wrong cut passes when only final outputs are compared"

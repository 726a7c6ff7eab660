"""Verification inside pk.prune: the pruned model must compute what the dense model computes with the removed
slices zeroed, or the prune raises naming the first diverging module and the ignore= that avoids it."""
import math

import pytest
import torch
import torch.nn as nn

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
    m, x = LabelsFromScores().eval(), torch.randn(1, 3, 6, 6)
    try:
        r = pk.prune(m, pk.Structured(ratio=0.4), example_inputs=x)
    except VerificationError as e:
        assert "ignore=" in str(e)
        return
    # the graph pinned the class dim (the only other way to be right): the classes are all still there
    assert r.model.cls_logits.out_channels == 10
    for a, b in zip(tensors_of(m(x)), tensors_of(r.model(x))):
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
    assert v["mode"] == "approximate" and v["max_rel_diff"] > 0 and "approximate" in r.summary()


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

"""Calibration that cannot lie: layer-wise only over a proven chain of blocks, Conv3d targets, and a Sparse
result that says what it left dense (functional weight use, low coverage of the matmul parameters)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit as pk
from prunekit.calibrate.layerwise import chain_break, find_blocks
from prunekit.sparse.masks import layer_input_rows, matmul_coverage, weight_2d


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class FPNHead(nn.Module):
    """One head per pyramid level: the ModuleList is not a chain (level i+1 never sees level i's output)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
                                   for _ in range(2))

    def forward(self, x):
        p0 = torch.relu(self.stem(x))
        p1 = torch.relu(self.down(p0))
        return torch.cat([self.heads[0](p0).flatten(2), self.heads[1](p1).flatten(2)], 2)


def test_chain_is_checked_on_the_calibration_pass():
    from prunekit.batch import as_batches
    m = Chain()
    b = as_batches([torch.randn(4, 8)], model=m)[0]
    assert chain_break(m, m.layers, b) is None
    f = FPNHead().eval()
    b = as_batches([torch.randn(1, 3, 16, 16)], model=f)[0]
    name, layers = find_blocks(f)
    assert name == "heads"
    assert "does not receive" in chain_break(f, layers, b)


def test_fpn_heads_fall_back_to_whole_model_and_say_so():
    f = FPNHead().eval()
    data = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    r = pk.prune(f, pk.Sparse(method="wanda", sparsity=0.5), data=data)
    assert r.stats["pipeline"] == "whole"
    assert "whole-model pass" in r.summary() and "'heads' is not a chain" in r.summary()
    # same masks as an explicit whole-model calibration
    w = pk.prune(f, pk.Sparse(method="wanda", sparsity=0.5, pipeline="whole", sequential=False), data=data)
    for (n, a), (_, b) in zip(r.model.state_dict().items(), w.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_real_chain_stays_layerwise():
    r = pk.prune(Chain(), pk.Sparse(method="wanda", sparsity=0.5), data=[torch.randn(4, 8)])
    assert r.stats["pipeline"] == "layerwise" and not r.stats["warnings"]


@pytest.mark.parametrize("kw", [{}, {"stride": (1, 2, 2), "padding": (0, 1, 2), "dilation": (1, 2, 1)},
                                {"padding": "same", "dilation": 2}, {"padding": 1, "padding_mode": "reflect"}])
def test_conv3d_rows_reproduce_the_convolution(kw):
    c = nn.Conv3d(3, 5, (2, 3, 3), **kw)
    x = torch.randn(2, 3, 6, 9, 10)
    y = c(x)
    rows = layer_input_rows(c, x)
    y2 = (rows @ weight_2d(c).T + c.bias).reshape(y.shape[0], *y.shape[2:], 5).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)


def test_conv3d_is_a_sparse_target():
    m = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 4, 1)).eval()
    r = pk.prune(m, pk.Sparse(method="wanda", sparsity=0.5), data=[torch.randn(1, 3, 4, 6, 6)])
    assert set(r.stats["sparsity"]) == {"0", "2"}
    assert r.stats["sparsity_total"] == pytest.approx(0.5, abs=0.01)
    assert r.stats["matmul_coverage"] == 1.0


class Functional(nn.Module):
    """Uses one layer's weight through F.linear (like Mamba's out_proj): its forward never runs."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 64)
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        return F.linear(torch.relu(self.inp(x)), self.out.weight)


def test_functional_weight_use_is_reported_as_skipped_and_coverage_is_stated():
    m = Functional()
    r = pk.prune(m, pk.Sparse(method="wanda", sparsity=0.5), data=[torch.randn(4, 8)])
    assert r.stats["skipped"] == ["out"]
    assert "skipped" in r.summary() and "out" in r.summary()
    assert matmul_coverage(m, ["inp"]) == pytest.approx(0.5)
    r = pk.prune(m, pk.Sparse(method="magnitude", sparsity=0.5, targets=["inp"]))
    assert "hold 50% of the model's matmul parameters" in r.summary()

"""Depth pruning inside the stages of hierarchical models, layer-wise calibration that checks the blocks'
other arguments, and weight-normalized layers (wav2vec2's positional conv). Tiny random-init models."""
import warnings

import pytest
import torch
import torch.nn as nn

import prunekit as pk
from prunekit.calibrate.layerwise import chain_break

T = pytest.importorskip("transformers")

HIER = {
    "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
        num_labels=3)), 32),
    "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[2, 2], num_labels=3)), 32),
    "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
        hidden_sizes=[8, 16], depths=[2, 2], embedding_size=8, num_labels=3)), 32),
}


def build(name):
    torch.manual_seed(0)
    make, size = HIER[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make().eval(), {"pixel_values": torch.randn(2, 3, size, size)}


def _stage_lengths(model):
    stages = model.base_model.encoder.layers if hasattr(model.base_model.encoder, "layers") \
        else model.base_model.encoder.stages
    return [len(s.blocks if hasattr(s, "blocks") else s.layers) for s in stages]


@pytest.mark.parametrize("name", list(HIER))
@pytest.mark.parametrize("importance", ["block_influence", "angular"])
def test_depth_within_stages(name, importance, tmp_path):
    m, x = build(name)
    before = _stage_lengths(m)
    r = pk.prune(m, pk.Layers(n=2, importance=importance), data=[x])
    after = _stage_lengths(r.model)
    assert sum(before) - sum(after) == 2 and len(after) == len(before)     # blocks go, stages stay
    assert len(r.plan.removed_blocks) == 2 and pk.count_params(r.model) < pk.count_params(m)
    assert _stage_lengths(m) == before                                     # the original is untouched
    with torch.no_grad():
        out = r.model(**x).logits
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    pk.save(r, tmp_path)
    with torch.no_grad():
        assert torch.equal(pk.load(tmp_path)(**x).logits, out)
    if r.plan.hf_config_exact:                # the config's per-stage depths were rewritten and verified
        assert list(r.model.config.depths) == after
        again = type(m).from_pretrained(str(tmp_path)).eval()
        with torch.no_grad():
            assert torch.equal(again(**x).logits, out)


def test_depth_removes_only_shape_keeping_blocks():
    """ResNet's first block of stage 1 widens and downsamples: it is never a candidate (stage 0's first block
    keeps the embedding's width and resolution, so it is one)."""
    m, x = build("resnet")
    r = pk.prune(m, pk.Layers(n=3), data=[x])
    assert sorted(r.plan.removed_blocks) == ["resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.0.layers.1",
                                             "resnet.encoder.stages.1.layers.1"]
    with torch.no_grad():
        assert r.model(**x).logits.shape == (2, 3)
    with pytest.raises(pk.ConfigError, match="more than the 3 blocks"):
        pk.prune(m, pk.Layers(n=4), data=[x])


class Pyramid(nn.Module):
    """Blocks that all change the width: no block can be removed."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8 * 2 ** i, 8 * 2 ** (i + 1)) for i in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_depth_without_removable_blocks_is_a_clear_error():
    with pytest.raises(pk.ConfigError, match="shaped like its input.*pk.Structured"):
        pk.prune(Pyramid(), pk.Layers(n=1), data=[torch.randn(4, 8)])


class Scaled(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w, w)

    def forward(self, h, scale):
        return h + self.lin(h) * scale


class PerBlockArgs(nn.Module):
    """Each block gets its own `scale`: replaying block 0's arguments would calibrate the others wrongly."""

    def __init__(self, same=False):
        super().__init__()
        self.blocks = nn.ModuleList([Scaled(8) for _ in range(3)])
        self.same = same

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x, 1.0 if self.same else float(i + 1))
        return x


def test_chain_break_checks_the_other_arguments():
    from prunekit.batch import as_batches
    batch = as_batches([torch.randn(4, 8)], model=PerBlockArgs())[0]
    m = PerBlockArgs()
    assert "other arguments" in chain_break(m, m.blocks, batch)
    m = PerBlockArgs(same=True)
    assert chain_break(m, m.blocks, batch) is None


def test_wanda_on_per_block_arguments_calibrates_the_whole_model():
    torch.manual_seed(0)
    m = PerBlockArgs().eval()
    data = [torch.randn(16, 8)]
    r = pk.prune(m, pk.Sparse(sparsity=0.5, method="wanda"), data=data)
    assert r.stats["pipeline"] == "whole" and any("other arguments" in w for w in r.stats["warnings"])
    # the whole-model pass sees each block's true input: block 2's masks equal Wanda on its real inputs
    from prunekit.sparse.algorithms import wanda_mask
    ins = {}
    hooks = [b.lin.register_forward_pre_hook(lambda mod, a, i=i: ins.__setitem__(i, a[0])) for i, b in
             enumerate(m.blocks)]
    with torch.no_grad():
        m(data[0])
    for h in hooks:
        h.remove()
    for i, b in enumerate(m.blocks):
        keep = wanda_mask(b.lin.weight, ins[i].pow(2).sum(0), 0.5)
        assert torch.equal(r.model.blocks[i].lin.weight != 0, keep)


class WeightNormed(nn.Module):
    """conv -> conv with weight norm over `dim` -> conv."""

    def __init__(self, dim):
        super().__init__()
        self.a = nn.Conv1d(4, 12, 3, padding=1)
        self.b = nn.utils.parametrizations.weight_norm(nn.Conv1d(12, 10, 3, padding=1), dim=dim)
        self.c = nn.Conv1d(10, 6, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("dim", [0, 2])
def test_weight_norm_is_pinned_and_kept(dim, tmp_path):
    """A weight-normalized conv keeps its channels (the norm spans them; along `dim` the zeroed-dense check
    would divide 0 by 0), its neighbours stay consistent, and save/load keeps the parametrization."""
    torch.manual_seed(0)
    m, x = WeightNormed(dim=dim).eval(), torch.randn(2, 4, 16)
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    wb = r.model.b.parametrizations.weight
    assert tuple(wb.original1.shape) == (10, 12, 3) and r.model.a.out_channels == 12
    assert r.model.c.in_channels == 10
    pk.save(r, tmp_path)
    again = pk.load(tmp_path, model=WeightNormed(dim=dim))
    assert hasattr(again.b.parametrizations.weight, "original0")          # weight norm kept, not baked
    with torch.no_grad():
        assert torch.equal(again(x), r.model(x))


def test_wav2vec2_prunes_and_reloads(tmp_path):
    torch.manual_seed(0)
    cfg = T.Wav2Vec2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=4)
    m, x = T.Wav2Vec2Model(cfg).eval(), {"input_values": torch.randn(2, 1600)}
    r = pk.prune(m, pk.Structured(ratio=0.3), example_inputs=x)
    assert pk.count_params(r.model) < pk.count_params(m)
    pk.save(r, tmp_path)
    with torch.no_grad():
        assert torch.equal(pk.load(tmp_path)(**x).last_hidden_state, r.model(**x).last_hidden_state)
    s = pk.prune(m, pk.Sparse(sparsity=0.5, method="wanda"), data=[x])
    assert abs(s.stats["sparsity_total"] - 0.5) < 0.02 and not s.stats["skipped"]

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


def test_mamba_prunes_its_inner_width(tmp_path):
    """Mamba's inner width couples in_proj's x and z halves, the depthwise conv1d, x_proj's input, dt_proj's
    output, A_log, D and out_proj's input; the scan's zero initial state does not pin it."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = T.MambaForCausalLM(T.MambaConfig(vocab_size=100, hidden_size=32, state_size=4, num_hidden_layers=2,
                                             expand=2, conv_kernel=4)).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 8))}
    r = pk.prune(m, pk.Structured(ratio=0.3), example_inputs=x)
    assert r.stats["verification"]["mode"] == "exact"
    for layer in r.model.backbone.layers:
        mx = layer.mixer
        w = mx.D.shape[0]
        assert 0 < w < 64 and mx.in_proj.out_features == 2 * w and mx.conv1d.weight.shape == (w, 1, 4)
        assert mx.conv1d.groups == w and mx.x_proj.in_features == w and mx.dt_proj.out_features == w
        assert mx.A_log.shape == (w, 4) and mx.out_proj.in_features == w
        assert mx.in_proj.in_features == 32 and mx.out_proj.out_features == 32     # residual width kept
    assert r.model.config.intermediate_size == r.model.backbone.layers[0].mixer.D.shape[0]
    g = r.model.generate(x["input_ids"][:1], max_new_tokens=4, do_sample=False)
    with torch.no_grad():                          # the cached recurrent path agrees with a full recompute
        assert int(r.model(input_ids=g[:, :-1]).logits[0, -1].argmax()) == int(g[0, -1])
    pk.save(r, tmp_path)
    with torch.no_grad():
        out = r.model(**x).logits
        assert torch.equal(pk.load(tmp_path)(**x).logits, out)
        if r.plan.hf_config_exact:
            assert torch.equal(T.MambaForCausalLM.from_pretrained(str(tmp_path)).eval()(**x).logits, out)


class Scan(nn.Module):
    """A recurrence from a zero state (like a selective scan), its size read from the layer ("attr"), written
    as a literal ("literal"), or followed by a product with data from outside ("noise")."""

    def __init__(self, mode):
        super().__init__()
        self.inp, self.out, self.mode = nn.Linear(8, 16), nn.Linear(16, 4), mode

    def forward(self, x):                      # x: (B, T, 8)
        h = x.new_zeros(x.shape[0], 16 if self.mode == "literal" else self.inp.out_features)
        for t in range(x.shape[1]):
            h = h * 0.9 + self.inp(x[:, t])
        if self.mode == "noise":               # a full-size tensor from outside: its channels must stay
            h = h * torch.linspace(0.5, 1.5, 16)
        return self.out(h)


@pytest.mark.parametrize("mode,width", [("attr", 8), ("literal", 16), ("noise", 16)])
def test_uniform_state_does_not_pin_channels(mode, width):
    """A zero state acts like a scalar; when its size is a literal the cut fails and is redone with the state
    pinning the channels it meets (no error); data from outside still pins them."""
    torch.manual_seed(0)
    m, x = Scan(mode).eval(), torch.randn(2, 5, 8)
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    assert r.model.inp.out_features == width


class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class TinyResNet(nn.Module):
    """No ModuleList: Sequential runs of same-class residual blocks, as in torchvision/timm CNNs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Res(8), Res(8))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.layer2 = nn.Sequential(Res(16), Res(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_depth_on_a_cnn_without_a_block_list(tmp_path):
    torch.manual_seed(0)
    m, x = TinyResNet().eval(), torch.randn(2, 3, 16, 16)
    r = pk.prune(m, pk.Layers(n=3), data=[x])
    assert len(r.model.layer1) + len(r.model.layer2) == 1 and len(r.plan.removed_blocks) == 3
    pk.save(r, tmp_path)
    with torch.no_grad():
        assert torch.equal(pk.load(tmp_path, model=TinyResNet().eval())(x), r.model(x))
    with pytest.raises(pk.ConfigError, match="more than the 4 blocks"):
        pk.prune(m, pk.Layers(n=5), data=[x])

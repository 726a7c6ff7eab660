"""Hand-built tiny models, one per graph rule, each run through the shared invariants."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import check_prunes, check_ratio_zero_identical, check_save_load, check_zero_channel_equivalence

import prunekit as pk


def bn(c):
    m = nn.BatchNorm2d(c)
    with torch.no_grad():
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
    return m


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), bn(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), bn(32), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1), bn(16))
        self.b = nn.Sequential(nn.Conv2d(16, 32, 1), bn(32), nn.ReLU(), nn.Conv2d(32, 16, 1), bn(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        x = F.relu(self.b(x) + x)
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Conv2d(3, 8, 3, padding=1)
        self.r = nn.Conv2d(3, 12, 1)
        self.n = bn(20)
        self.out = nn.Conv2d(20, 6, 1)

    def forward(self, x):
        y = torch.cat([self.l(x), F.relu(self.r(x))], dim=1)
        return self.out(F.relu(self.n(y))).flatten(1)


class SplitChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 16, 1)
        self.sizes = [8, 8]
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = F.relu(self.c0(x))
        p, q = torch.split(y, self.sizes, dim=1)
        z = torch.cat([F.relu(self.a(p)), self.b(q)], 1)
        return self.fc(z.mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 1)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.n = bn(32)
        self.dw = nn.Conv2d(32, 64, 3, padding=1, groups=32)   # depthwise with channel multiplier 2
        self.c2 = nn.Conv2d(64, 8, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.n(self.g(x)))
        return self.c2(F.relu(self.dw(x))).mean((2, 3))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.c(x)), 4)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class HeadAttention(nn.Module):
    """Attention written the usual way: one qkv Linear, reshape to heads, attention, merge heads."""

    def __init__(self, dim=32, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                   # (B, T, C)
        B, T, _ = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                    # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        y = att.softmax(-1) @ v                             # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class TinyViT(nn.Module):
    """Class token, position embedding (parameters without modules), LayerScale, attention + MLP."""

    def __init__(self, dim=32):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = HeadAttention(dim, 4)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)        # (B, 16, C)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = x + self.gamma * self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(x[:, 0])


class RelPosAttention(nn.Module):
    """Relative position bias table (a parameter indexed by a buffer) added per head, Swin style."""

    def __init__(self, dim=24, heads=3, n=4):
        super().__init__()
        self.heads = heads
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads))
        idx = torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1
        self.register_buffer("index", idx)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].permute(2, 0, 1)      # (heads, N, N)
        a = (q @ k.transpose(-2, -1)) * 0.1 + bias
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1))


class TiedLM(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 48), nn.ReLU(), nn.Linear(48, dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.lm_head(h + self.ff(h))


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        B, C, H, W = y.shape
        y = y.view(B, 2, C // 2, H, W).transpose(1, 2).reshape(B, C, H, W)
        return self.c(y).mean((2, 3))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.gn(self.c1(x)))).mean((2, 3))


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        h = self.inp(x)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return h + self.ff(h)


IMG = lambda: torch.randn(2, 3, 16, 16)
CASES = {
    "residual": (Residual, IMG),
    "concat": (Concat, IMG),
    "split": (SplitChunk, IMG),
    "grouped": (Grouped, IMG),
    "flatten_linear": (FlattenLinear, IMG),
    "attention_reshape": (lambda: nn.Sequential(HeadAttention(32, 4), nn.GELU(), nn.Linear(32, 2)),
                          lambda: torch.randn(2, 5, 32)),
    "vit_params_without_modules": (TinyViT, IMG),
    "relative_position_table": (RelPosAttention, lambda: torch.randn(2, 4, 24)),
    "tied_embedding": (TiedLM, lambda: torch.randint(0, 50, (2, 7))),
    "channel_shuffle": (ChannelShuffle, IMG),
    "group_norm": (GroupNormNet, IMG),
    "multihead_attention_module": (WithMHA, lambda: torch.randn(2, 5, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invariants(case, tmp_path):
    build, inp = CASES[case]
    torch.manual_seed(0)
    m = build().eval()
    x = inp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_ratio_zero_identical(m, x)
        r = check_prunes(m, x, ratio=0.5)
        if any(g.exact for g in pk.DependencyGraph(m, x).groups):
            check_zero_channel_equivalence(m, x, fraction=0.5)
        torch.manual_seed(1)
        check_save_load(r, build().eval(), x, tmp_path)


def test_residual_couples_all_writers():
    m, x = Residual().eval(), IMG()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    p = r.model
    # stem, a[3], a[4], b[3], b[4] write into one residual stream: all keep the same channels
    widths = {p.stem[0].out_channels, p.a[3].out_channels, p.a[4].num_features, p.b[3].out_channels,
              p.head.in_features, p.a[0].in_channels, p.b[0].in_channels}
    assert widths == {8}
    assert p.a[0].out_channels == 16 and p.b[0].out_channels == 16


def test_concat_offsets():
    m, x = Concat().eval(), IMG()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    assert r.model.l.out_channels == 4 and r.model.r.out_channels == 6
    assert r.model.n.num_features == 10 and r.model.out.in_channels == 10


def test_grouped_conv_keeps_groups():
    m, x = Grouped().eval(), IMG()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x).model
    assert r.g.groups == 4 and r.g.in_channels % 4 == 0 and r.g.out_channels % 4 == 0
    assert r.g.in_channels == 16 and r.g.out_channels == 16
    assert r.dw.groups == r.dw.in_channels == r.g.out_channels and r.dw.out_channels == 2 * r.dw.groups


def test_flatten_linear_expands_channels():
    m, x = FlattenLinear().eval(), IMG()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x).model
    assert r.c.out_channels == 4 and r.fc1.in_features == 4 * 16


def test_heads_pruned_whole_and_attribute_updated():
    att = HeadAttention(32, 4).eval()
    m = nn.Sequential(att, nn.Linear(32, 2)).eval()
    x = torch.randn(2, 5, 32)
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x).model
    a = r[0]
    assert a.num_heads == 2 and a.head_dim == 8
    assert a.qkv.out_features == 3 * 2 * 8 and a.proj.in_features == 16


def test_relative_position_table_follows_heads():
    m, x = RelPosAttention().eval(), torch.randn(2, 4, 24)
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x).model
    assert r.heads == 2 and r.table.shape == (7, 2)


def test_tied_weights_stay_tied():
    m, x = TiedLM().eval(), torch.randint(0, 50, (2, 7))
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x).model
    assert r.lm_head.weight is r.emb.weight
    assert r.emb.num_embeddings == 50          # the vocabulary is the output: kept
    assert r.emb.embedding_dim == r.lm_head.in_features == r.ff[2].out_features == 8   # hidden dim pruned
    assert r.ff[0].out_features == 24


def test_vit_params_without_modules_pruned():
    m, x = TinyViT().eval(), IMG()
    g = pk.DependencyGraph(m, x)
    names = {mm.name for grp in g.groups for mm in grp.members}
    assert {"cls", "pos", "gamma", "ln1.weight", "patch.weight"} <= names
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x).model
    assert r.cls.shape[-1] == r.pos.shape[-1] == r.gamma.shape[0] == r.patch.out_channels == 16
    assert r.attn.num_heads == 2


def test_channel_shuffle_couples_branches():
    m, x = ChannelShuffle().eval(), IMG()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x).model
    assert r.a.out_channels == r.b.out_channels == 4 and r.c.in_channels == 8


def test_global_ranking_and_round_to():
    m, x = Residual().eval(), IMG()
    r = pk.prune(m, pk.Structured(ratio=0.5, global_ranking=True, round_to=4), example_inputs=x).model
    for conv in (r.a[0], r.b[0], r.stem[0]):
        assert conv.out_channels % 4 == 0
    assert pk.count_params(r) < pk.count_params(m)


def test_per_module_ratio_and_ignore():
    m, x = Residual().eval(), IMG()
    r = pk.prune(m, pk.Structured(ratio={r"a\.0": 0.5}), example_inputs=x).model
    assert r.a[0].out_channels == 16 and r.b[0].out_channels == 32 and r.stem[0].out_channels == 16
    r2 = pk.prune(m, pk.Structured(ratio=0.5, ignore=["b.0"]), example_inputs=x).model
    assert r2.b[0].out_channels == 32 and r2.a[0].out_channels == 16


def test_callable_importance_picks_units():
    m, x = FlattenLinear().eval(), IMG()

    def keep_last(group, tensors):
        return torch.arange(group.n_units, dtype=torch.float64)

    r = pk.prune(m, pk.Structured(ratio=0.5, importance=keep_last), example_inputs=x)
    assert r.plan.kept["c.weight"]["0"] == [4, 5, 6, 7]


def test_inplace_flag():
    m, x = Residual().eval(), IMG()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    assert m.a[0].out_channels == 32 and r.model is not m
    r2 = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x, inplace=True)
    assert r2.model is m and m.a[0].out_channels == 16


def test_dtype_device_requires_grad_kept():
    m = Residual().eval().double()
    m.stem[0].weight.requires_grad_(False)
    x = IMG().double()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x).model
    assert all(p.dtype == torch.float64 for p in r.parameters())
    assert not r.stem[0].weight.requires_grad and r.a[0].weight.requires_grad
    assert isinstance(r.a[0], nn.Conv2d) and not r.a[0]._forward_hooks and not r.a[0]._forward_pre_hooks


def test_multihead_attention_heads_pruned_and_reloaded(tmp_path):
    m, x = WithMHA().eval(), torch.randn(2, 5, 8)
    from prunekit.nn import MultiheadAttention
    # the conversion alone computes the same function
    conv = MultiheadAttention.from_torch(m.mha)
    for kw in ({"need_weights": False}, {"need_weights": True},
               {"need_weights": False, "key_padding_mask": torch.tensor([[False] * 4 + [True]] * 2)}):
        a, wa = m.mha(x.new_ones(2, 5, 16) * x.sum(-1, keepdim=True), x.new_ones(2, 5, 16), x.new_ones(2, 5, 16), **kw)
        h = m.inp(x)
        a, wa = m.mha(h, h, h, **kw)
        b, wb = conv(h, h, h, **kw)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if kw.get("need_weights"):
            torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    att = r.model.mha
    assert isinstance(att, MultiheadAttention) and att.num_heads == 1 and att.q_proj.out_features == 8
    assert r.plan.convert_mha == ["mha"] and isinstance(m.mha, nn.MultiheadAttention)   # original untouched
    pk.save(r, tmp_path)
    again = pk.load(tmp_path, model=WithMHA().eval())
    assert torch.equal(again(x), r.model(x))

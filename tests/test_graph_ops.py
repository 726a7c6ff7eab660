"""Graph rules for the ops of issue 10 (keyword arguments, data-dependent ops, in-place writes, grouped expert
matmul, split sizes computed in code) and GraphError hints that work. Tiny in-file models; timm models at tiny
sizes when timm is installed."""
import ast
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import GroupedExperts, check_prunes, check_save_load, check_zero_channel_equivalence, outputs

import prunekit as pk
from prunekit.errors import GraphError

try:
    import torchvision
except ImportError:                     # the roi/nms test skips
    torchvision = None


def IMG():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def SEQ():
    return torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))


def widths(graph):
    return {m.name: m for g in graph.groups for m in g.members}


# ------------------------------------------------------------------------------------------ keyword arguments

class KeywordContractions(nn.Module):
    """BLOOM-style attention scores: baddbmm(alibi, batch1=q, batch2=k^T) and addmm(b, mat1=, mat2=)."""
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 16)
        self.k = nn.Linear(8, 16)
        self.w = nn.Parameter(torch.randn(8, 12) * 0.3)
        self.b = nn.Parameter(torch.randn(12) * 0.1)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        alibi = torch.zeros(x.shape[0], x.shape[1], x.shape[1])
        s = torch.baddbmm(alibi, batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=0.25)
        h = torch.addmm(self.b, mat1=(s.softmax(-1) @ x).reshape(-1, 8), mat2=self.w)
        return self.out(F.relu(h)).reshape(x.shape[0], x.shape[1], 4)


def test_baddbmm_addmm_read_keyword_arguments(tmp_path):
    m, x = KeywordContractions().eval(), SEQ()
    g = pk.DependencyGraph(m, x)
    names = widths(g)
    assert {"q.weight", "k.weight", "w"} <= set(names)
    r = check_prunes(m, x)
    assert r.model.q.out_features == r.model.k.out_features < 16       # q/k coupled through batch1/batch2
    assert r.model.w.shape[1] == r.model.b.shape[0] == r.model.out.in_features < 12
    check_zero_channel_equivalence(m, x)
    check_save_load(r, KeywordContractions().eval(), x, tmp_path)


def test_bloom_attention_traces():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    m = transformers.BloomForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    g = pk.DependencyGraph(m, {"input_ids": ids})
    assert any(mm.name.endswith("query_key_value.weight") for grp in g.groups for mm in grp.members)


# ------------------------------------------------------------------------------------------ data-dependent ops

class TopkTokens(nn.Module):
    """Keep the 3 strongest tokens (topk over the token dim); channels pass through to the head."""
    def __init__(self, dim=1):
        super().__init__()
        self.dim = dim
        self.inp = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.inp(x))
        if self.dim == 1:
            vals, idx = h.topk(3, dim=1)
            s = torch.sort(h, dim=1).values[:, -1:]
            g = torch.gather(h, 1, torch.argsort(h, dim=1)[:, :2])     # indices pick tokens, channel by channel
            return self.head(vals + s + g.mean(1, keepdim=True))
        vals, idx = h.topk(16, dim=-1)                   # over the channels: they cannot be pruned
        return self.head(vals)


def test_topk_sort_argsort_keep_channels_of_other_dims():
    m, x = TopkTokens(dim=1).eval(), SEQ()
    r = check_prunes(m, x)
    assert r.model.inp.out_features == r.model.head.in_features < 16
    check_zero_channel_equivalence(m, x)


def test_topk_over_the_channel_dim_pins_it():
    m, x = TopkTokens(dim=-1).eval(), SEQ()
    g = pk.DependencyGraph(m, x)
    assert "inp.weight" not in widths(g)                   # the sorted channels stay
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    assert r.model.inp.out_features == 16
    assert outputs(r.model, x)[0].shape == outputs(m, x)[0].shape


class TinyDetector(nn.Module):
    """Backbone -> roi_align / roi_pool / MultiScaleRoIAlign -> box head; nms on the box scores."""
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.fpn = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.score = nn.Conv2d(16, 1, 1)
        self.head = nn.Linear(16 * 2 * 2 * 3, 5)

    def forward(self, x):
        f = self.backbone(x)
        p = F.relu(self.fpn(f))
        boxes = torch.tensor([[0, 0, 0, 8, 8.], [1, 2, 2, 12, 14], [0, 4, 4, 15, 15]])
        a = torchvision.ops.roi_align(f, boxes, 2, spatial_scale=1.0, sampling_ratio=2)
        b = torchvision.ops.roi_pool(f, boxes, 2)
        pool = torchvision.ops.MultiScaleRoIAlign(["f", "p"], 2, 2)
        c = pool({"f": f, "p": p}, [boxes[boxes[:, 0] == i, 1:] for i in range(2)], [(16, 16)] * 2)
        scores = self.score(f).amax((1, 2, 3))
        keep = torchvision.ops.batched_nms(boxes[:2, 1:], scores[:2] + boxes[:2, 1], torch.tensor([0, 1]), 0.5)
        feats = torch.cat([a, b, c[torch.tensor([0, 2, 1])]], 1).flatten(1)
        return self.head(feats)[keep.sort().values[:1]].sum(0) + self.head(feats).sum(0)


def test_roi_ops_keep_feature_channels_prunable():
    if torchvision is None:
        pytest.skip("torchvision is not installed")
    m, x = TinyDetector().eval(), IMG()
    r = check_prunes(m, x)
    assert r.model.backbone[0].out_channels < 16
    assert r.model.fpn.out_channels == r.model.fpn.in_channels == r.model.backbone[0].out_channels
    assert r.model.head.in_features == r.model.backbone[0].out_channels * 4 * 3
    check_zero_channel_equivalence(m, x)


# ------------------------------------------------------------------------------------------ in-place writes

class InPlace(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h, g = self.a(x), self.b(x)
        idx = torch.tensor([0, 2, 1, 0, 5, 4])
        if self.op == "copy_":
            out = torch.zeros_like(h).copy_(h) + g
        elif self.op == "index_add_":
            out = g.clone().index_add_(1, idx, h)
        elif self.op == "index_copy_":
            out = g.clone().index_copy_(1, torch.tensor([5, 4, 3, 2, 1, 0]), h)
        elif self.op == "scatter_add_":
            out = g.clone().scatter_add_(1, idx.view(1, 6, 1).expand_as(h), h)     # index shaped like the data
        elif self.op == "scatter_":
            out = g.clone().scatter_(1, torch.tensor([5, 4, 3, 2, 1, 0]).view(1, 6, 1).expand_as(h), h)
        elif self.op == "masked_fill_":
            out = (h + g).masked_fill_(x[..., :1] > 0.5, 0.0)
        else:
            out = torch.zeros(h.shape)                # sized from the data, like MultiScaleRoIAlign's result
            out[torch.tensor([1, 0])] = h
            out = out + g
        return self.head(F.relu(out))


@pytest.mark.parametrize("op", ["copy_", "index_add_", "index_copy_", "scatter_", "scatter_add_", "masked_fill_",
                                "setitem"])
def test_in_place_writes_couple_the_written_channels(op):
    m, x = InPlace(op).eval(), SEQ()
    r = check_prunes(m, x)
    assert r.model.a.out_features == r.model.b.out_features == r.model.head.in_features < 16
    check_zero_channel_equivalence(m, x)


class ChannelScatter(nn.Module):
    """scatter along the channel dim: which channel receives what depends on the index, so channels stay."""
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        idx = torch.arange(16).flip(0).expand(2, 6, 16)
        return self.head(torch.zeros_like(h).scatter_(2, idx, h))


def test_scatter_along_channels_pins_them():
    m, x = ChannelScatter().eval(), SEQ()
    assert "a.weight" not in widths(pk.DependencyGraph(m, x))


class NormalizedEmbeddings(nn.Module):
    """CLIP/OWL-ViT-style: embeddings divided by their norm, written three ways (the `ord` argument in second
    position must not be read as a dim)."""
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = self.b(F.relu(self.a(x)))                                        # (B, T, 12)
        e1 = h / torch.linalg.norm(h, dim=-1, keepdim=True)
        e2 = h / torch.linalg.vector_norm(h, 2, -1, True)
        e3 = h / h.norm(2, -1, keepdim=True)
        return self.head(e1 + e2 + e3)


def test_linalg_norms_reduce_the_dim_they_name():
    m, x = NormalizedEmbeddings().eval(), SEQ()
    r = check_prunes(m, x)
    assert r.model.a.out_features < 16 and r.model.b.out_features < 12
    check_zero_channel_equivalence(m, x)


class OutOfPlaceWrites(nn.Module):
    """PhiMoE-style router masking with torch.scatter(scores, -1, top, -inf), and tokens gathered back with an
    out-of-place index_add: the copies carry the input's channels, the written dim is pinned."""
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = x.flatten(0, 1)                                                  # (T, 8)
        scores = self.router(t)                                              # (T, E)
        top = scores.argmax(-1, keepdim=True)
        second = torch.scatter(scores, -1, top, float("-inf")).softmax(-1)   # (T, E)
        h = F.relu(self.up(t))                                               # (T, 16)
        idx = torch.arange(t.shape[0]).flip(0)
        h = torch.zeros_like(h).index_add(0, idx, h)                         # rows permuted, channels kept
        y = self.down(h) * second.amax(-1, keepdim=True)
        return self.head(y.scatter_add(0, idx[:, None].expand_as(y), y))


def test_out_of_place_scatter_and_index_add_keep_channels():
    m, x = OutOfPlaceWrites().eval(), SEQ()
    r = check_prunes(m, x)
    assert r.model.up.out_features < 16 and r.model.router.out_features == 4      # experts dim pinned
    check_zero_channel_equivalence(m, x)


class SameSizedAttributes(nn.Module):
    """torchvision-ViT-style: `hidden` and `image_size` are both 8; forward reshapes with self.hidden and
    checks the input against self.image_size. Only the attribute passed to reshape may follow the cut."""
    def __init__(self):
        super().__init__()
        self.image_size, self.hidden = 8, 8
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        assert x.shape[-1] == self.image_size, f"expected {self.image_size}, got {x.shape[-1]}"
        n = x.shape[0]
        width = self.hidden
        h = self.proj(x).reshape(n, width, -1)                               # (N, hidden, patches)
        return self.head(h.mean(-1))


def test_literal_size_rewrites_only_the_attribute_the_code_reshapes_with():
    m, x = SameSizedAttributes().eval(), torch.randn(2, 3, 8, 8)
    r = check_prunes(m, x)
    assert r.model.hidden == r.model.proj.out_channels < 8 and r.model.image_size == 8


class SwapsHalves(nn.Module):
    """Every prunable width goes through a split by a literal list: nothing can be cut."""
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        lo, hi = self.a(x).split([6, 10], dim=-1)
        return self.head(torch.cat([hi, lo], -1))


def test_a_cut_that_removes_nothing_says_which_op_pinned_the_channels():
    m, x = SwapsHalves().eval(), SEQ()
    with pytest.warns(UserWarning, match=r"removed nothing: .*op 'split' in the top-level forward"):
        r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    assert r.stats["pinned_by"][0] == "op 'split' in the top-level forward of the model"
    assert "removed nothing" in r.summary() and r.stats["params_after"] == r.stats["params_before"]
    assert torch.equal(r.model(x), m(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # ratio 0 asks for nothing: no warning
        pk.prune(m, pk.Structured(ratio=0.0), example_inputs=x)


def test_grouped_mm_prunes_expert_widths():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    m, x = GroupedExperts().eval(), SEQ()
    r = check_prunes(m, x, round_to=4)                   # the CPU kernel wants 16-byte strides
    assert r.model.w1.shape[0] == 2 and r.model.w1.shape[2] == r.model.w2.shape[1] < 32
    assert r.model.w1.shape[1] == r.model.inp.out_features == r.model.w2.shape[2] == r.model.head.in_features
    check_zero_channel_equivalence(m, x)


# ------------------------------------------------------------------------------------------ computed split sizes

class SplitByAttribute(nn.Module):
    """Res2Net-style: split(x, self.width) into 3 parts, a conv per part, residual chain, concat."""
    def __init__(self, width=6, scale=3):
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(3, width * scale, 1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(width * scale, 8, 1)

    def forward(self, x):
        spx = torch.split(F.relu(self.conv1(x)), self.width, 1)
        out, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = F.relu(conv(sp))
            out.append(sp)
        return self.conv3(torch.cat(out + [spx[-1]], 1))


class SplitByHalfTotal(nn.Module):
    """CSPDarkNet-style: x.split(self.expand_chs // 2, dim=1)."""
    def __init__(self):
        super().__init__()
        self.expand_chs = 16
        self.exp = nn.Conv2d(3, 16, 1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.trans = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        xs, xb = F.relu(self.exp(x)).split(self.expand_chs // 2, dim=1)
        return self.trans(torch.cat([xs, F.relu(self.block(xb))], 1))


@pytest.mark.parametrize("cls", [SplitByAttribute, SplitByHalfTotal])
def test_split_size_attribute_rewritten(cls, tmp_path):
    m, x = cls().eval(), IMG()
    r = check_prunes(m, x)
    if cls is SplitByAttribute:
        assert r.model.width < 6 and r.model.conv1.out_channels == 3 * r.model.width
        assert ["", "width", r.model.width] in r.plan.attrs
    else:
        assert r.model.expand_chs < 16 and r.model.exp.out_channels == r.model.expand_chs
        assert r.model.block.in_channels == r.model.expand_chs // 2
    check_zero_channel_equivalence(m, x)
    check_save_load(r, cls().eval(), x, tmp_path)


def _timm_tiny(name):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    torch.manual_seed(0)
    if name == "res2net":
        from timm.models.res2net import Bottle2neck
        from timm.models.resnet import ResNet
        m = ResNet(block=Bottle2neck, layers=[1, 1, 1, 1], channels=(8, 8, 16, 16), stem_width=8, base_width=48,
                   block_args=dict(scale=4), num_classes=5)
    else:
        from timm.models.cspnet import CspModelCfg, CspNet, CspStagesCfg, CspStemCfg
        cfg = CspModelCfg(stem=CspStemCfg(out_chs=8, kernel_size=3, stride=1, pool=""),
                          stages=CspStagesCfg(depth=(1, 1), out_chs=(16, 32), stride=2, expand_ratio=(2., 1.),
                                              bottle_ratio=(0.5, 1.), block_ratio=(1., 0.5), down_growth=True,
                                              block_type="dark"))
        m = CspNet(cfg, num_classes=5)
    assert timm.__version__
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.mark.parametrize("name", ["res2net", "cspdarknet"])
def test_timm_split_models_prune(name, tmp_path, recwarn):
    m, x = _timm_tiny(name), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r = check_prunes(m, x)
    assert not [w for w in recwarn if "breaks their forward" in str(w.message)], "a module class was auto-ignored"
    attr = "width" if name == "res2net" else "expand_chs"
    changed = [a for a in r.plan.attrs if a[1] == attr]
    assert changed and all(getattr(r.model.get_submodule(mod), attr) == v for mod, _, v in changed)
    check_save_load(r, _timm_tiny(name), x, tmp_path)


# ------------------------------------------------------------------------------------------ hints that work

def _hinted_ignore(message):
    assert "<model>" not in message and "ignore=['']" not in message and "\n" not in message
    found = re.search(r"ignore=(\[[^\]]*\])", message)
    assert found, message
    names = ast.literal_eval(found.group(1))
    assert names and all(names), message
    return names


class Unknown(nn.Module):
    """logcumsumexp has no channel rule: inside a module, at the top level, and on a model parameter."""
    def __init__(self, where):
        super().__init__()
        self.where = where
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 16, 16) * 0.1)
        self.inner = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.inner(self.stem(x))
        if self.where == "param":                     # fed by a parameter of the model itself
            h = h + torch.logcumsumexp(self.pos, dim=2)
        if self.where == "top":
            h = torch.logcumsumexp(h, dim=2)
        return self.head(h.mean((2, 3)))


class InnerUnknown(nn.Module):
    def forward(self, h):
        return torch.logcumsumexp(h, dim=1)


@pytest.mark.parametrize("where", ["module", "top", "param"])
def test_graph_error_hint_names_a_working_ignore(where):
    m, x = Unknown(where).eval(), IMG()
    if where == "module":
        m.inner.append(InnerUnknown())
    with pytest.raises(GraphError) as e:
        pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    msg = str(e.value)
    assert "'logcumsumexp'" in msg
    names = _hinted_ignore(msg)
    expected = {"module": ["inner.2"], "top": ["inner.0"], "param": ["pos"]}[where]
    assert names[:1] == expected, msg
    r = pk.prune(m, pk.Structured(ratio=0.5, ignore=names), example_inputs=x)
    assert outputs(r.model, x)[0].shape == outputs(m, x)[0].shape


class LiteralTopLevelView(nn.Module):
    """The top-level forward reshapes with a literal channel count: the cut fails outside any module."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16 * 16 // 4, 3)

    def forward(self, x):
        h = F.relu(self.a(x)) * torch.sigmoid(self.b(x)).mean()
        return self.head(h.reshape(2, 4, 8 * 16 * 16 // 4).mean(1))


def test_cut_failure_at_top_level_hints_a_working_ignore():
    m, x = LiteralTopLevelView().eval(), IMG()
    with pytest.raises(GraphError) as e:
        pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    names = _hinted_ignore(str(e.value))
    r = pk.prune(m, pk.Structured(ratio=0.5, ignore=names), example_inputs=x)
    assert outputs(r.model, x)[0].shape == outputs(m, x)[0].shape


def test_register_adds_a_rule_for_a_new_op():
    from prunekit.graph.rules import RULES, register
    from prunekit.graph.rules.elementwise import unary
    m, x = Unknown("top").eval(), IMG()
    assert "logcumsumexp" not in RULES
    try:
        @register("logcumsumexp")
        def rule_logcumsumexp(tr, args, kwargs, out):     # cumulative along a spatial dim: channels pass
            dim = args[1] if len(args) > 1 else kwargs["dim"]
            assert dim % args[0].dim() != 1
            unary(tr, "logcumsumexp", args, kwargs, out)

        r = check_prunes(m, x)
        assert r.model.inner[0].out_channels < 8
    finally:
        RULES.pop("logcumsumexp", None)


# ------------------------------------------------------------------------------------ values that are positions

class PositionsAsLabels(nn.Module):
    """A detector head followed by post-processing that turns positions along the class dim into labels, in
    the ways torchvision's FCOS/RetinaNet and common code do. `thresh` above every score leaves the
    post-processed outputs empty (random weights): the class dim must stay pinned anyway."""
    def __init__(self, how, thresh=2.0):
        super().__init__()
        self.how, self.thresh = how, thresh
        self.body = nn.Conv2d(3, 16, 3, padding=1)
        self.cls_logits = nn.Conv2d(16, 10, 1)
        self.bbox_pred = nn.Conv2d(16, 10 * 4, 1)                         # per-class boxes, as Faster R-CNN

    def forward(self, x):
        feats = F.relu(self.body(x))
        logits = self.cls_logits(feats)                                   # (N, K, H, W)
        if self.how == "index_other":        # positions found in the scores index the per-class boxes
            boxes = self.bbox_pred(feats).permute(0, 2, 3, 1).reshape(-1, 4)      # (N * H * W * K, 4)
            inds = torch.where(logits.permute(0, 2, 3, 1).sigmoid().flatten() > self.thresh)[0]
            return boxes[inds], logits
        per_pos = logits.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 10)  # (N, HW, K)
        scores = per_pos.sigmoid()
        k = per_pos.shape[-1]
        if self.how == "mask_where_topk":                                  # FCOS / RetinaNet
            flat = scores[0].flatten()
            keep = flat > self.thresh
            kept, idx = flat[keep], torch.where(keep)[0]
            kept, order = kept.topk(min(5, kept.numel()))
            idx = idx[order]
            return kept, idx // k, idx % k
        if self.how == "nonzero":
            idx = (scores[0] > self.thresh).nonzero()
            return idx[:, 1]
        if self.how == "argmax":
            return scores.argmax(-1)
        if self.how == "max_dim":
            return scores.max(dim=-1)
        raise ValueError(self.how)


@pytest.mark.parametrize("how", ["mask_where_topk", "nonzero", "argmax", "max_dim", "index_other"])
def test_values_that_are_positions_pin_the_class_dim(how):
    m, x = PositionsAsLabels(how).eval(), IMG()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    assert r.model.cls_logits.out_channels == 10, "positions along the class dim are labels: it must stay"
    if how == "index_other":
        assert r.model.bbox_pred.out_channels == 40, "positions index the boxes: they must stay"
    assert r.model.body.out_channels < 16, "the rest still prunes"
    assert r.stats["verification"]["mode"] == "exact"


def test_a_mask_over_positions_without_channels_leaves_channels_prunable():
    """x[mask] with a mask over (batch, tokens) only: the channel dim lines up and still prunes."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            h = F.relu(self.inp(x))
            keep = x[..., 0] > -10.0                  # (B, T), no parameter ids
            return self.out(h[keep]).sum(0)

    m, x = Masked().eval(), SEQ()
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x)
    assert r.model.inp.out_features == r.model.out.in_features < 16

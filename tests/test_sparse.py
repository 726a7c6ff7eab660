"""pk.Sparse: mask algorithms on hand-computed cases, SparseGPT vs least squares, parametrized masks, OWL."""
import json
import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import prunekit as pk  # noqa: E402
from prunekit.config import config_from_dict  # noqa: E402
from prunekit.errors import (
    CalibrationDataError,  # noqa: E402
    ConfigError,
)
from prunekit.sparse import (  # noqa: E402
    InputStats,
    Sparse,
    bake,
    magnitude_mask,
    masks,
    owl_block_sparsity,
    parse_pattern,
    sparsegpt_prune,
    sparsity_stats,
    wanda_mask,
    wanda_scores,
)

torch.set_num_threads(1)
V = 64


def tiny_llama(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)).eval()


def calib(n=4, b=2, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (b, t), generator=g) for _ in range(n)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------------------------- config

def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("1:8") == (1, 8)
    for bad in ("3:2", "4:4", "0:4", "2-4", "dense"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


@pytest.mark.parametrize("kwargs, field", [
    (dict(pattern="3:2"), "pattern"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity="0.5"), "sparsity"),
    (dict(method="obs"), "method"),
    (dict(sparsity=0.6, pattern="2:4"), "sparsity"),
    (dict(owl=True, pattern="2:4"), "owl"),
    (dict(owl=True, sparsity=0.1, owl_lambda=0.08), "owl_lambda"),
    (dict(allocation="outliers"), "allocation"),
    (dict(allocation="sensitivity", pattern="2:4"), "allocation"),
    (dict(allocation="sensitivity", owl=True), "owl"),
    (dict(allocation="sensitivity", sensitivity_sparsity=1.0), "sensitivity_sparsity"),
    (dict(allocation="sensitivity", sensitivity_batches=0), "sensitivity_batches"),
    (dict(targets="q_proj"), "targets"),
    (dict(ignore=["("]), "ignore"),
    (dict(blocksize=0), "blocksize"),
    (dict(pipeline="whole"), "pipeline"),
])
def test_bad_config_raises_config_error_naming_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Sparse(**kwargs)


def test_config_round_trips_through_dict():
    for cfg in (Sparse(sparsity=0.5, method="sparsegpt", pattern="2:4", ignore=["mlp"]),
                Sparse(method="wanda", allocation="sensitivity", owl_lambda=0.1, sensitivity_batches=2),
                Sparse(method="wanda", owl=True)):
        again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
    assert Sparse(owl=True).allocation == "owl"


# --------------------------------------------------------------------------------------------- algorithms

def test_magnitude_mask_layerwise_vs_nm_by_hand():
    W = torch.tensor([[1.0, -4.0, 2.0, 3.0],
                      [5.0, 6.0, -8.0, 7.0]])
    # unstructured compares the whole layer: the four smallest |w| (1, 2, 3, 4) are all in row 0
    assert magnitude_mask(W, 0.5).tolist() == [[False, False, False, False], [True, True, True, True]]
    # 2:4 keeps the two largest of each group of four in every row
    assert magnitude_mask(W, 0.5, "2:4").tolist() == [[False, True, False, True], [False, False, True, True]]
    assert magnitude_mask(W, 0.25, per_row=True).tolist() == [[False, True, True, True], [False, True, True, True]]


def test_wanda_scores_and_mask_by_hand():
    W = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    act_sq = torch.tensor([16.0, 1.0])                        # feature 0 is 4x louder than feature 1
    assert wanda_scores(W, act_sq).tolist() == [[4.0, 2.0], [12.0, 4.0]]
    # per output row, keep the larger |W|*||X||: column 0 in both rows, although |W| says column 1
    assert wanda_mask(W, act_sq, 0.5).tolist() == [[True, False], [True, False]]
    assert magnitude_mask(W, 0.5, per_row=True).tolist() == [[False, True], [False, True]]
    W4 = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert wanda_mask(W4, torch.tensor([1.0, 1.0, 100.0, 100.0]), 0.5, "2:4").tolist() == [[False, False, True, True]]


def test_nm_masks_need_divisible_columns():
    with pytest.raises(ValueError, match="divisible by 4"):
        magnitude_mask(torch.randn(2, 6), 0.5, "2:4")


def test_input_stats_streaming_equals_one_shot():
    X = torch.randn(3, 5, 6, dtype=torch.float64)             # (batches, tokens, features)
    st = InputStats(6, dtype=torch.float64)
    for x in X:
        st.add_batch(x.unsqueeze(0))                            # (1, 5, 6): leading dims are flattened
    flat = X.reshape(-1, 6)
    torch.testing.assert_close(st.H, 2.0 / 15 * flat.T @ flat)
    torch.testing.assert_close(st.sq_norm, (flat ** 2).mean(0))
    assert st.nsamples == 15


def _problem(seed=0, n=200, cin=12, cout=5):
    """Correlated inputs whose features have different scales (like LLM activations), random weights."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cin, dtype=torch.float64) + 0.3 * torch.randn(cin, cin, generator=g, dtype=torch.float64)
    scale = 0.6 + 3 * torch.rand(cin, generator=g, dtype=torch.float64)
    X = torch.randn(n, cin, generator=g, dtype=torch.float64) @ mix * scale
    W = torch.randn(cout, cin, generator=g, dtype=torch.float64)
    st = InputStats(cin, dtype=torch.float64)
    st.add_batch(X)
    return X, W, st.H


def _lstsq_optimum(X, W, keep):
    """Brute force: for each row, the weights on kept columns that best reproduce X @ w (least squares)."""
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        S = keep[r].nonzero().flatten()
        out[r, S] = torch.linalg.lstsq(X[:, S], (X @ W[r]).unsqueeze(1)).solution.flatten()
    return out


def _recon_error(X, W, Wn):
    return float(((X @ (W - Wn).T) ** 2).sum())


def test_sparsegpt_equals_least_squares_when_pruned_columns_come_first():
    """Pruning a prefix of columns is where sequential OBS is exact: each step optimally re-fits all later
    columns, so the result must equal the least-squares optimum for that mask (no dampening)."""
    X, W, H = _problem()
    keep = torch.ones_like(W, dtype=torch.bool)
    for r, k in enumerate([0, 1, 3, 6, 11]):                    # row r prunes its first k columns
        keep[r, :k] = False
    Ws, mask = sparsegpt_prune(W, H, 0.5, blocksize=4, percdamp=0.0, mask=keep)   # 3 blocks: lazy updates used
    assert torch.equal(mask, keep)
    torch.testing.assert_close(Ws, _lstsq_optimum(X, W, keep), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("seed", range(3))
def test_sparsegpt_error_is_between_optimum_and_plain_masking(seed):
    """For any fixed mask the least-squares fit is a lower bound; with its own mask, SparseGPT's update must
    beat merely zeroing the same weights."""
    X, W, H = _problem(seed)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(10 + seed)) > 0.5
    Ws, _ = sparsegpt_prune(W, H, 0.5, blocksize=4, percdamp=0.0, mask=keep)
    assert _recon_error(X, W, _lstsq_optimum(X, W, keep)) <= _recon_error(X, W, Ws) * (1 + 1e-9)
    assert torch.all(Ws[~keep] == 0)
    Ws, own = sparsegpt_prune(W, H, 0.5, blocksize=4)
    opt, sgpt, naive = (_recon_error(X, W, w) for w in (_lstsq_optimum(X, W, own), Ws, W * own))
    assert opt <= sgpt * (1 + 1e-9) and sgpt < 0.9 * naive


def test_sparsegpt_cannot_compensate_the_last_column():
    """Errors only flow to later columns: pruning just the last column must equal plain masking."""
    X, W, H = _problem(3)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[:, -1] = False
    Ws, _ = sparsegpt_prune(W, H, 0.5, blocksize=5, mask=keep)
    torch.testing.assert_close(Ws, W * keep, rtol=0, atol=1e-12)


def test_sparsegpt_lazy_blocks_do_not_change_the_result():
    X, W, H = _problem(1)
    ref, ref_mask = sparsegpt_prune(W, H, 0.5, "2:4", blocksize=12)
    for bs in (1, 4, 8):                                        # 1 and 8 are rounded to multiples of M=4
        Ws, mask = sparsegpt_prune(W, H, 0.5, "2:4", blocksize=bs)
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(Ws, ref, rtol=1e-10, atol=1e-10)


def test_sparsegpt_masks_have_the_requested_structure():
    X, W, H = _problem(2, cin=16, cout=6)
    Ws, keep = sparsegpt_prune(W, H, 0.5, "unstructured", blocksize=8)
    assert int((~keep).sum()) == W.numel() // 2 and torch.all(Ws[~keep] == 0)
    Ws, keep = sparsegpt_prune(W, H, 0.5, "2:4", blocksize=8)
    assert torch.all(keep.reshape(6, 4, 4).sum(-1) == 2)
    Ws, keep = sparsegpt_prune(W.float(), H.float(), 0.75, "1:4")
    assert Ws.dtype == torch.float32 and torch.all(keep.reshape(6, 4, 4).sum(-1) == 1)
    # and it beats magnitude pruning with the same mask budget on the calibration data
    mag = W * magnitude_mask(W, 0.5)
    assert _recon_error(X, W, sparsegpt_prune(W, H, 0.5)[0]) < _recon_error(X, W, mag)


def test_owl_block_sparsity_by_hand():
    s = owl_block_sparsity([1.0, 2.0, 3.0], 0.5, 0.1)           # densities 0.4, 0.5, 0.6
    assert s == pytest.approx([0.6, 0.5, 0.4])
    assert owl_block_sparsity([2.0, 2.0], 0.5, 0.1) == pytest.approx([0.5, 0.5])


# --------------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_2_4_on_llama_has_exact_structure(method):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = pk.prune(model, Sparse(sparsity=0.5, method=method, pattern="2:4"), data=calib())
    mods = dict(res.model.named_modules())
    assert len(res.stats["sparsity"]) == 14 and "lm_head" not in res.stats["sparsity"]
    for name in res.stats["sparsity"]:
        W = mods[name].weight                                   # the masked weight itself
        assert torch.all((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2)
        assert torch.all(masks(res.model)[name].reshape(W.shape[0], -1, 4).sum(-1) == 2)
    assert res.stats["sparsity_total"] >= 0.5
    json.dumps(res.plan.to_dict())
    assert res.plan.layers["model.layers.0.mlp.down_proj"] == {
        "method": method, "sparsity": 0.5, "pattern": "2:4", "shape": [32, 64], "layout": "out,in"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # inplace=False: untouched
    assert not masks(model) and res.model is not model
    assert not torch.equal(res.model.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_wanda_unstructured_is_exact_per_output_row():
    res = pk.prune(tiny_llama(), Sparse(sparsity=0.3, method="wanda"), data=calib())
    for name, keep in masks(res.model).items():
        assert torch.all((~keep).sum(1) == int(keep.shape[1] * 0.3)), name


def test_gpt2_conv1d_layers_are_pruned_along_their_input_dim():
    res = pk.prune(tiny_gpt2(), Sparse(sparsity=0.5, method="sparsegpt", pattern="2:4"), data=calib())
    c_fc = res.model.transformer.h[0].mlp.c_fc                 # Conv1D weight is (in=32, out=128)
    nz = (c_fc.weight != 0).T.reshape(128, 8, 4).sum(-1)
    assert torch.all(nz <= 2) and res.plan.layers["transformer.h.0.mlp.c_fc"]["shape"] == [128, 32]
    assert "lm_head" not in res.stats["sparsity"] and not any("wte" in n for n in res.stats["sparsity"])


def test_data_aware_methods_beat_magnitude_on_calibration_data():
    """Wanda and SparseGPT exist to keep outputs closer to the dense model than magnitude does."""
    model, data = tiny_llama(), calib(n=6)
    ref = torch.cat([logits(model, x) for x in data])
    err = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = pk.prune(model, Sparse(sparsity=0.6, method=method), data=data).model
        err[method] = float(((torch.cat([logits(m, x) for x in data]) - ref) ** 2).mean())
    assert err["sparsegpt"] < err["magnitude"] and err["wanda"] < err["magnitude"]


def test_masks_survive_an_optimizer_step_and_bake_keeps_outputs():
    res = pk.prune(tiny_llama(), Sparse(sparsity=0.5, method="wanda"), data=calib(), inplace=True)
    model, ids = res.model, calib(n=1)[0]
    keep = {n: k.clone() for n, k in masks(model).items()}
    mods = dict(model.named_modules())
    before = mods["model.layers.0.mlp.up_proj"].weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = mods["model.layers.0.mlp.up_proj"].weight.detach()
    assert not torch.equal(before, after)                       # training did change the kept weights
    for name, k in keep.items():
        assert torch.all(mods[name].weight[~k] == 0), name
    out = logits(model, ids)
    assert bake(model) == 14 and not masks(model)
    W = mods["model.layers.0.mlp.up_proj"].weight
    assert type(W) is nn.Parameter and torch.equal(W, after)
    assert torch.equal(logits(model, ids), out)


def test_bake_option_and_sparsity_stats_on_plain_weights():
    res = pk.prune(tiny_llama(), Sparse(sparsity=0.5, method="magnitude", bake=True))  # magnitude needs no data
    assert res.stats["baked"] == 14 and not masks(res.model)
    stats = sparsity_stats(res.model, list(res.stats["sparsity"]))
    assert stats["total"] == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_zero_sparsity_is_bit_identical(method):
    model, data = tiny_llama(), calib()
    res = pk.prune(model, Sparse(sparsity=0.0, method=method), data=data)
    for x in data:
        assert torch.equal(logits(res.model, x), logits(model, x))
    assert res.stats["sparsity_total"] == 0.0


@pytest.mark.parametrize("data, match", [
    ([], "empty"),
    ([torch.randn(2, 16)], "integer token ids"),
    ([torch.randint(0, V, (16,))], "unsqueeze"),
    (torch.randint(0, V, (2, 16)), "single tensor"),
    (None, "required"),
])
def test_bad_data_raises_before_weights_change(data, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationDataError, match=match):
        pk.prune(model, Sparse(method="sparsegpt"), data=data, inplace=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_targets_and_ignore_select_layers():
    res = pk.prune(tiny_llama(), Sparse(method="magnitude", targets=[r"layers\.1\."], ignore=[r"mlp"]))
    assert sorted(res.stats["sparsity"]) == sorted(f"model.layers.1.self_attn.{p}_proj" for p in "qkvo")
    with pytest.raises(ConfigError, match="matches no linear or ungrouped conv layer"):
        pk.prune(tiny_llama(), Sparse(method="magnitude", targets=["nonexistent"]))


def test_nm_pattern_rejects_layers_with_odd_input_size_before_pruning():
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"0 \(in_features=6\)"):
        pk.prune(model, Sparse(method="magnitude", pattern="2:4"), inplace=True)
    assert not masks(model)


def test_whole_pipeline_matches_layerwise_without_sequential():
    """Both pipelines see dense activations when sequential=False, so they must choose the same masks."""
    model, data = tiny_llama(), calib()
    a = pk.prune(model, Sparse(method="wanda", sequential=False), data=data).model
    b = pk.prune(model, Sparse(method="wanda", sequential=False, pipeline="whole"), data=data).model
    ma, mb = masks(a), masks(b)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_owl_gives_outlier_heavy_block_lower_sparsity_with_target_mean():
    model, data = tiny_llama(layers=4), calib()
    with torch.no_grad():                       # block 2: every layer gets 2 input columns 10x larger (outliers)
        for mod in model.model.layers[2].modules():
            if isinstance(mod, nn.Linear):
                mod.weight[:, :2] *= 10.0
    res = pk.prune(model, Sparse(sparsity=0.5, method="wanda", owl=True, owl_lambda=0.1), data=data)
    owl = res.plan.owl
    assert owl["groups"] == [0, 1, 2, 3]
    assert sum(owl["sparsity"]) / 4 == pytest.approx(0.5)
    assert owl["sparsity"][2] == min(owl["sparsity"]) < 0.5                     # block 2 is kept densest
    assert max(owl["sparsity"]) - min(owl["sparsity"]) == pytest.approx(0.2)    # spread 2 * owl_lambda
    assert owl["outlier_ratio"][2] == max(owl["outlier_ratio"])
    assert res.plan.layers["model.layers.2.mlp.up_proj"]["sparsity"] == owl["sparsity"][2]
    assert res.stats["sparsity"]["model.layers.2.mlp.up_proj"] < res.stats["sparsity"]["model.layers.0.mlp.up_proj"]
    json.dumps(res.plan.to_dict())


def test_bert_pooler_outside_blocks_is_pruned_too():
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)).eval()
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in calib()]
    res = pk.prune(model, Sparse(sparsity=0.5, method="sparsegpt"), data=data)
    assert res.stats["sparsity"]["pooler.dense"] == pytest.approx(0.5)
    assert len(res.stats["sparsity"]) == 13


def test_layers_reading_the_same_tensor_share_statistics():
    from prunekit.sparse.prune import _attach_stats
    model = tiny_llama(layers=1)
    mods = dict(model.named_modules())
    names = [n for n in mods if n.startswith("model.layers.0.") and isinstance(mods[n], nn.Linear)]
    live, seen = {}, {}
    handles = _attach_stats(mods, names, True, True, live)
    handles += [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].clone()))
                for n in names]
    for x in calib(n=2):
        logits(model, x)
    for h in handles:
        h.remove()
    p = "model.layers.0."
    assert live[p + "self_attn.q_proj"] is live[p + "self_attn.k_proj"] is live[p + "self_attn.v_proj"]
    assert live[p + "mlp.gate_proj"] is live[p + "mlp.up_proj"]
    assert len({id(s) for s in live.values()}) == 4            # qkv, o, gate/up, down
    for n in names:                                             # shared or not, the statistics are each layer's own
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[n]])
        torch.testing.assert_close(live[n].H, 2.0 / X.shape[0] * X.T @ X, rtol=1e-4, atol=1e-5)


def test_layers_that_never_run_are_left_dense_and_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, 8)
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, input_ids):
            return self.used(self.emb(input_ids))
    res = pk.prune(Net(), Sparse(method="wanda", pipeline="whole", sequential=False), data=calib())
    assert res.stats["skipped"] == ["unused"]
    assert res.stats["sparsity"] == {"used": 0.5, "unused": 0.0}


# ------------------------------------------------------------------------------------------------ convolutions

CONV_CASES = [  # (conv, input shape)
    (lambda: nn.Conv2d(3, 8, 3, padding=1), (2, 3, 9, 9)),
    (lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1), (2, 3, 9, 9)),
    (lambda: nn.Conv2d(4, 6, (3, 1), padding=(2, 0), dilation=(2, 1)), (2, 4, 7, 5)),
    (lambda: nn.Conv2d(3, 5, 3, padding="same"), (2, 3, 6, 6)),
    (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    (lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2), (2, 4, 11)),
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_input_rows_reproduce_the_convolution(case):
    """rows @ weight_2d.T is the convolution: the statistics Wanda/SparseGPT use are those of its real GEMM."""
    from prunekit.sparse.masks import layer_input_rows, weight_2d
    torch.manual_seed(case)
    make, shape = CONV_CASES[case]
    conv = make().eval()
    x = torch.randn(shape)
    rows = layer_input_rows(conv, x)                                   # [B * positions, C * k]
    y = conv(x)                                                        # [B, out, *spatial]
    as_rows = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])    # [B * positions, out]
    torch.testing.assert_close(rows @ weight_2d(conv).T + conv.bias, as_rows, rtol=1e-5, atol=1e-5)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(8, 16, 1, stride=2)          # reads c2's input: must not share its statistics
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h) + self.skip(h))
        return self.fc(self.dw(h).mean((2, 3)))


@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("wanda", "unstructured"),
                                            ("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "2:4")])
def test_sparse_prunes_convolutions_exactly(method, pattern):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    data = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    nm = pattern == "2:4"                                # c1's 3*3*3 = 27 inputs do not split into groups of 4
    if nm:
        with pytest.raises(ConfigError, match="c1 .in_features=27"):
            pk.prune(model, Sparse(sparsity=0.5, method=method, pattern=pattern), data=data)
    res = pk.prune(model, Sparse(sparsity=0.5, method=method, pattern=pattern, ignore=["^c1$"] if nm else ()),
                   data=data)
    m = res.model
    assert sorted(res.plan.layers) == ["c1", "c2", "fc", "skip"][nm:]       # depthwise conv is not a target
    for name in ("c1", "c2", "skip")[nm:]:
        W = getattr(m, name).weight                                        # masked view, original 4-D layout
        assert W.shape == getattr(model, name).weight.shape
        W2 = W.reshape(W.shape[0], -1)
        assert abs(float((W2 == 0).float().mean()) - 0.5) < 0.02               # c1 has 27 columns per row
        if method == "wanda" or pattern == "2:4":                            # Wanda: per output row, exactly
            assert bool(((W2 == 0).sum(1) == W2.shape[1] // 2).all())
        if pattern == "2:4":
            assert bool(((W2.reshape(W2.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
    assert not torch.nn.utils.parametrize.is_parametrized(m.dw)
    torch.testing.assert_close(m.dw.weight, model.dw.weight)


def test_data_aware_conv_pruning_beats_magnitude_on_layer_outputs():
    """SparseGPT on a conv reconstructs its outputs on the calibration patches better than magnitude."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1).eval()
    x = torch.randn(8, 6, 10, 10) * torch.linspace(0.1, 3.0, 6).view(1, 6, 1, 1)
    model = nn.Sequential(conv)
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned = pk.prune(model, Sparse(sparsity=0.5, method=method), data=[x]).model
        errs[method] = float((pruned(x) - model(x)).pow(2).mean())
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"]


def test_conv_model_calibrates_from_input_target_pairs_and_rejects_bad_batches():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    xs = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    pairs = [(x, torch.zeros(4, dtype=torch.long)) for x in xs]
    a = pk.prune(model, Sparse(sparsity=0.5, method="sparsegpt"), data=pairs).model
    b = pk.prune(model, Sparse(sparsity=0.5, method="sparsegpt"), data=xs).model
    assert torch.equal(a.c2.weight, b.c2.weight)                   # targets are ignored, inputs used
    with pytest.raises(CalibrationDataError, match="empty"):
        pk.prune(model, Sparse(sparsity=0.5, method="wanda"), data=[torch.zeros(0)])


def test_baking_a_copy_leaves_the_original_masked_and_working():
    """torch shares the parametrized class between a module and its deepcopy; baking the copy must not strip
    the original's `weight` (a saved checkpoint used to break the model still in memory)."""
    import copy
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 12, 12)
    pruned = pk.prune(model, Sparse(sparsity=0.5, method="magnitude")).model
    before = pruned(x)
    twin = copy.deepcopy(pruned)
    assert bake(twin) == 4
    assert torch.equal(twin(x), before)
    assert torch.equal(pruned(x), before) and len(masks(pruned)) == 4



# ------------------------------------------------------------------------------------------ sensitivity allocation

def test_wanda_probe_zeroes_then_restores_weights_bit_exactly():
    from prunekit.sparse.prune import _wanda_probe
    torch.manual_seed(0)
    model = TinyCNN()
    modules = dict(model.named_modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = {"c2": torch.rand(8 * 9), "fc": torch.rand(16)}
    with _wanda_probe(modules, ["c2", "fc"], norms, 0.75):
        assert float((model.c2.weight == 0).float().mean()) == pytest.approx(0.75, abs=0.02)
        assert int((model.fc.weight == 0).sum()) == 4 * 12
        assert torch.equal(model.c1.weight, before["c1.weight"])
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_sensitivity_allocation_spares_the_layer_whose_pruning_hurts_most():
    """Two layers (each its own group in a model without blocks): the one whose probe raised the output error
    more gets target - lambda, the other target + lambda, and the layers are pruned to those sparsities."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].weight.mul_(5.0)                        # the first layer dominates the output
        model[2].weight.copy_(torch.randn(8, 32) * 0.01 + model[2].weight.sign() * 0.2)   # flat magnitudes
    data = [torch.randn(16, 16) for _ in range(3)]
    res = pk.prune(model, Sparse(sparsity=0.5, method="wanda", allocation="sensitivity", owl_lambda=0.1), data=data)
    info = res.plan.allocation
    assert info["method"] == "sensitivity" and info["groups"] == ["0", "2"] and res.plan.owl is None
    score = dict(zip(info["groups"], info["score"]))
    sp = dict(zip(info["groups"], info["sparsity"]))
    assert all(v > 0 for v in score.values())
    hi, lo = max(score, key=score.get), min(score, key=score.get)
    assert sp[hi] == pytest.approx(0.4) and sp[lo] == pytest.approx(0.6)
    assert res.stats["sparsity"]["0"] == pytest.approx(sp["0"], abs=1 / 16)       # per row of 16 inputs
    assert res.stats["sparsity"]["2"] == pytest.approx(sp["2"], abs=1 / 32)


def test_sensitivity_allocation_on_a_language_model_uses_its_loss_per_block():
    model = tiny_llama(layers=3)
    data = calib(n=3)
    res = pk.prune(model, Sparse(sparsity=0.5, method="sparsegpt", allocation="sensitivity", sensitivity_batches=2),
                   data=data)
    info = res.plan.allocation
    assert info["groups"] == [0, 1, 2] and info["probe_batches"] == 2
    with torch.no_grad():
        dense = sum(float(model(input_ids=x, labels=x).loss) for x in data[:2]) / 2
    assert info["loss_dense"] == pytest.approx(dense, rel=1e-5)
    assert sum(info["sparsity"]) / 3 == pytest.approx(0.5)
    assert res.stats["sparsity_total"] == pytest.approx(0.5, abs=0.02)
    for i, s in enumerate(info["sparsity"]):                     # every layer of block i got block i's sparsity
        for n, v in res.stats["sparsity"].items():
            if n.startswith(f"model.layers.{i}."):
                assert v == pytest.approx(s, abs=0.03)

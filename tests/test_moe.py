"""Mixture of experts: whole-expert removal from routing statistics, per-expert FFN width, Wanda/SparseGPT on
stacked (experts, out, in) weights, for the grouped-matmul and the eager expert implementations."""
import warnings

import pytest
import torch

import prunekit as pk

transformers = pytest.importorskip("transformers")
import transformers as T  # noqa: E402

from prunekit.models.moe import find_moe_blocks  # noqa: E402

BASE = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
FAMILIES = {
    "mixtral": lambda impl: T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                 experts_implementation=impl, **BASE)),
    "qwen2_moe": lambda impl: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        experts_implementation=impl, **BASE)),
    "qwen3_moe": lambda impl: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, experts_implementation=impl,
        **BASE)),
}


def build(name, impl="grouped_mm"):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FAMILIES[name](impl).eval()


def data(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (2, 16), generator=g) for _ in range(n)]


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def routing_scores(model, batches):
    """Hand computation of the expert score: summed top-k router weight per expert / tokens, per block."""
    out = {}
    hooks = []
    for b in find_moe_blocks(model):
        acc = {"w": torch.zeros(b.n_experts, dtype=torch.float64), "n": 0}
        out[b.name] = acc

        def hook(mod, args, output, acc=acc):
            _, weights, idx = output
            for t in range(idx.shape[0]):
                for j in range(idx.shape[1]):
                    acc["w"][int(idx[t, j])] += float(weights[t, j])
            acc["n"] += idx.shape[0]
        hooks.append(b.router.register_forward_hook(hook))
    for ids in batches:
        logits(model, ids)
    for h in hooks:
        h.remove()
    return {k: (v["w"] / v["n"]).tolist() for k, v in out.items()}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_remove_experts_and_width(name, tmp_path):
    m = build(name)
    batches = data()
    r = pk.prune(m, pk.Experts(ratio=0.5, width=0.5), data=batches)
    p, cfg = r.model, r.model.config
    n_exp = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    assert n_exp == 2 and cfg.num_experts_per_tok == 2
    expected = routing_scores(m, batches)
    for b_old, b_new in zip(find_moe_blocks(m), find_moe_blocks(p)):
        assert b_new.n_experts == 2 and b_new.router.weight.shape[0] == 2
        assert b_new.width == b_old.width // 2
        score = torch.tensor(expected[b_old.name])
        assert torch.allclose(torch.tensor(r.stats["expert_scores"][b_old.name], dtype=torch.float64),
                              score.double(), atol=1e-5)
        kept = r.plan.kept[b_old.router_name + ".weight"]["0"]
        assert min(score[kept]) >= max(score[[i for i in range(4) if i not in kept]])   # the lowest went
        assert torch.equal(b_new.router.weight, b_old.router.weight[kept])              # router rows follow
    ids = batches[0]
    y = logits(p, ids)
    assert r.plan.hf_config_exact
    pk.save(r, tmp_path)
    assert torch.equal(logits(pk.load(tmp_path), ids), y)
    assert torch.equal(logits(pk.load(tmp_path, model=build(name)), ids), y)
    assert torch.equal(logits(type(m).from_pretrained(str(tmp_path)).eval(), ids), y)
    g = p.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert g.shape == (1, 12)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_width_equals_zeroed_neurons(impl):
    """Cutting expert neurons computes exactly what the dense model computes with those neurons zeroed."""
    m = build("mixtral", impl)
    batches = data()
    r = pk.prune(m, pk.Experts(ratio=0.0, width=0.5), data=batches)
    z = build("mixtral", impl)
    with torch.no_grad():
        for b in find_moe_blocks(z):
            gu, down = b.experts.gate_up_proj, b.experts.down_proj
            per = r.plan.kept[f"{b.experts_name}.down_proj"]["2"]
            for e, keep in enumerate(per):
                gone = [j for j in range(b.width) if j not in keep]
                down[e][:, gone] = 0
                gu[e][gone] = 0
                gu[e][[b.width + j for j in gone]] = 0
    assert torch.allclose(logits(r.model, batches[0]), logits(z, batches[0]), atol=1e-5, rtol=1e-4)


def test_eager_and_grouped_agree():
    ra = pk.prune(build("qwen2_moe", "eager"), pk.Experts(ratio=0.25, width=0.25), data=data())
    rb = pk.prune(build("qwen2_moe", "grouped_mm"), pk.Experts(ratio=0.25, width=0.25), data=data())
    assert ra.plan.kept.keys() == rb.plan.kept.keys()
    assert ra.plan.kept["model.layers.0.mlp.gate.weight"] == rb.plan.kept["model.layers.0.mlp.gate.weight"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sparse_covers_stacked_expert_weights(method, tmp_path):
    m = build("mixtral")
    batches = data()
    r = pk.prune(m, pk.Sparse(sparsity=0.5, method=method), data=batches)
    for b in find_moe_blocks(r.model):
        for p in (b.experts.gate_up_proj, b.experts.down_proj):
            assert float((p == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
            for e in range(p.shape[0]):       # per output row of every expert (Wanda's comparison group)
                rows = p[e] if p is b.experts.gate_up_proj else p[e]
                assert float((rows == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert f"{find_moe_blocks(m)[0].experts_name}.down_proj" in r.stats["sparsity"]
    dense_share = sum(p.numel() for b in find_moe_blocks(m) for p in (b.experts.gate_up_proj, b.experts.down_proj))
    assert r.stats["params_targeted"] >= dense_share
    pk.save(r, tmp_path)
    assert torch.equal(logits(pk.load(tmp_path, model=build("mixtral")), batches[0]), logits(r.model, batches[0]))


def test_wanda_uses_routed_tokens():
    """An expert's mask comes from the tokens routed to it: Wanda on expert 0's gate/up equals the hand
    computation |W| * ||x_routed|| per output row."""
    from prunekit.sparse.algorithms import wanda_mask
    m = build("mixtral")
    batches = data(1)
    b = find_moe_blocks(m)[0]
    seen = {}

    def hook(mod, args):
        x, idx = args[0], args[1]
        seen["x"] = x[(idx == 0).any(-1)]
    h = b.experts.register_forward_pre_hook(hook)
    logits(m, batches[0])
    h.remove()
    want = b.experts.gate_up_proj[0].detach() * wanda_mask(b.experts.gate_up_proj[0].detach(),
                                                           seen["x"].pow(2).sum(0), 0.5)
    r = pk.prune(m, pk.Sparse(sparsity=0.5, method="wanda", targets=[r"layers\.0\.mlp"]), data=batches)
    assert torch.equal(find_moe_blocks(r.model)[0].experts.gate_up_proj[0], want)


def test_errors():
    dense = T.LlamaForCausalLM(T.LlamaConfig(**BASE)).eval()
    with pytest.raises(pk.ConfigError, match="no mixture-of-experts block"):
        pk.prune(dense, pk.Experts(ratio=0.5), data=data(1))
    with pytest.raises(pk.CalibrationDataError, match="data="):
        pk.prune(build("mixtral"), pk.Experts(ratio=0.5))
    with pytest.raises(pk.ConfigError, match="ratio"):
        pk.Experts(ratio=1.0)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_structured_prunes_stacked_experts_in_16_byte_rows(impl):
    """pk.Structured cuts the shared expert-FFN width of stacked (E, ., .) expert weights; the grouped kernel
    needs 16-byte row strides, so the kept width is rounded to 4 float32 channels (48 -> 36 at ratio 0.3,
    not 34) and the cut is verified, not skipped."""
    m = build("mixtral", impl)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)          # no "leaving MixtralExperts untouched" fallback
        r = pk.prune(m, pk.Structured(ratio=0.3), example_inputs={"input_ids": data(1)[0]}, data=data(2))
    widths = {p.shape[2] for n, p in r.model.named_parameters() if n.endswith("experts.down_proj")}
    assert widths and all(w % 4 == 0 and w < 48 for w in widths), widths
    assert r.stats["verification"]["mode"] == "exact"
    assert torch.isfinite(logits(r.model, data(1)[0])).all()

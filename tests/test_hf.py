"""Hugging Face transformers through pk.prune: tiny random-init models from configs, one per family."""
import warnings

import pytest
import torch

import prunekit as pk

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

IDS = lambda: {"input_ids": torch.randint(0, 100, (2, 8))}
FAMILIES = {
    "llama_gqa": (lambda: LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, tie_word_embeddings=True)), IDS),
    "qwen2_gqa": (lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2)), IDS),
    "bert": (lambda: BertModel(BertConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4)),
             lambda: {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32)), IDS),
    "opt": (lambda: OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                             num_attention_heads=4, word_embed_proj_dim=64,
                                             max_position_embeddings=32)), IDS),
    "vit": (lambda: ViTForImageClassification(ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                        num_attention_heads=4, image_size=32, patch_size=8,
                                                        num_labels=3)),
            lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}),
}
# families whose config can express fewer heads (explicit head_dim): plain from_pretrained reloads them
FROM_PRETRAINED = {"llama_gqa", "qwen2_gqa", "vit"}


def main_out(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def build(name):
    torch.manual_seed(0)
    make, inp = FAMILIES[name]
    return make().eval(), inp()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_heads_and_ffn(name, tmp_path):
    m, x = build(name)
    cfg = m.config
    hidden = cfg.hidden_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no module may be auto-ignored in a supported family
        r0 = pk.prune(m, pk.Structured(ratio=0.0), example_inputs=x)
        r = pk.prune(m, pk.Structured(ratio=0.5, importance="l2"), example_inputs=x)   # no data: say magnitude
    assert torch.equal(main_out(r0.model(**x)), main_out(m(**x)))
    p = r.model
    assert pk.count_params(p) < pk.count_params(m)
    assert main_out(p(**x)).shape == main_out(m(**x)).shape
    # heads halved (whole KV groups for GQA), FFN halved, hidden size kept by default
    from prunekit.models import hf
    sizes = hf.layer_sizes(p, cfg)
    assert sizes["heads"] == [cfg.num_attention_heads // 2] * cfg.num_hidden_layers, sizes
    if sizes["kv_heads"] and getattr(cfg, "num_key_value_heads", None):
        kv = cfg.num_key_value_heads
        assert sizes["kv_heads"] == [kv // 2] * cfg.num_hidden_layers
        assert sizes["heads"][0] // sizes["kv_heads"][0] == cfg.num_attention_heads // kv   # q/kv mapping kept
    assert len(set(sizes["ffn"])) == 1
    assert sizes["ffn"][0] * 2 == (getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
                                   or getattr(cfg, "n_inner", None) or 4 * hidden)
    assert hf._embedding_width(p) == hidden
    # save -> reload without the original, and with plain from_pretrained where the config can say it
    pk.save(r, tmp_path)
    y = main_out(p(**x))
    assert torch.equal(main_out(pk.load(tmp_path)(**x)), y)
    fresh, _ = build(name)
    assert torch.equal(main_out(pk.load(tmp_path, model=fresh)(**x)), y)
    if name in FROM_PRETRAINED:
        assert r.plan.hf_config_exact
        again = type(m).from_pretrained(str(tmp_path)).eval()
        assert torch.equal(main_out(again(**x)), y)


def test_nonuniform_widths_reload(tmp_path):
    m, x = build("llama_gqa")
    r = pk.prune(m, pk.Structured(ratio={r"model\.layers\.0\..*": 0.5}), example_inputs=x)
    assert not r.plan.hf_config_exact
    pk.save(r, tmp_path)
    assert torch.equal(main_out(pk.load(tmp_path)(**x)), main_out(r.model(**x)))


def test_hidden_dim_option():
    m, x = build("llama_gqa")
    r = pk.prune(m, pk.Structured(ratio=0.5, prune_hidden=True), example_inputs=x)
    assert r.model.config.hidden_size == 32
    assert r.model.lm_head.weight is r.model.model.embed_tokens.weight     # tied embeddings stay tied
    assert main_out(r.model(**x)).shape == (2, 8, 100)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "opt"])
def test_generate_after_width_and_depth(name):
    m, x = build(name)
    r = pk.prune(m, pk.Structured(ratio=0.5), example_inputs=x).model
    r = pk.prune(r, pk.Layers(n=1, importance="block_influence"), data=[x["input_ids"]]).model
    g = r.generate(x["input_ids"][:1], max_new_tokens=4, do_sample=False)
    assert g.shape == (1, 12)
    # greedy decoding with the KV cache equals recomputing the whole sequence each step
    with torch.no_grad():
        full = r(input_ids=g[:, :-1]).logits[0, -1].argmax()
    assert int(full) == int(g[0, -1])


@pytest.mark.parametrize("importance", ["block_influence", "angular", "greedy_loss"])
def test_layers(importance, tmp_path):
    m, x = build("llama_gqa")
    data = [torch.randint(0, 100, (2, 8)) for _ in range(2)]
    r = pk.prune(m, pk.Layers(n=1, importance=importance), data=data)
    assert len(r.model.model.layers) == 1 and r.model.config.num_hidden_layers == 1
    assert r.model.model.layers[0].self_attn.layer_idx == 0
    pk.save(r, tmp_path)
    again = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert torch.equal(again(**x).logits, r.model(**x).logits)


def test_bad_input():
    m, x = build("llama_gqa")
    with pytest.raises(pk.ConfigError, match="n"):
        pk.Layers(n=-1)
    with pytest.raises(pk.ConfigError, match="importance"):
        pk.Layers(n=1, importance="nope")
    with pytest.raises(ValueError, match="data"):
        pk.prune(m, pk.Layers(n=1))
    with pytest.raises(pk.ConfigError, match="all 2 blocks"):
        pk.prune(m, pk.Layers(n=2), data=[x["input_ids"]])


def test_sparse_save_load_roundtrip(tmp_path):
    m, x = build("llama_gqa")
    r = pk.prune(m, pk.Sparse(sparsity=0.5, method="magnitude", pattern="2:4"), data=[x["input_ids"]])
    w = r.model.model.layers[0].mlp.up_proj.weight
    assert float((w == 0).float().mean()) == 0.5
    pk.save(r, tmp_path)
    fresh, _ = build("llama_gqa")
    again = pk.load(tmp_path, model=fresh)
    assert torch.equal(again(**x).logits, r.model(**x).logits)
    assert float((again.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5


def test_fluctuation_scores_and_bias_compensation(tmp_path):
    from prunekit.structured.criteria import fluctuation_values
    # hand case: channel variance times squared column norm
    var = torch.tensor([1.0, 0.0, 4.0])
    w = torch.tensor([[1.0, 3.0, 1.0], [1.0, 4.0, 0.0]])
    assert torch.equal(fluctuation_values(var, w), torch.tensor([2.0, 0.0, 4.0]))
    m, x = build("llama_gqa")
    data = [{"input_ids": torch.randint(0, 100, (2, 16))} for _ in range(2)]
    no_comp = pk.prune(m, pk.Structured(ratio=0.25, importance=pk.Fluctuation(data=data, bias_compensation=False)),
                       example_inputs=x)
    comp = pk.prune(m, pk.Structured(ratio=0.25, importance=pk.Fluctuation(data=data)), example_inputs=x)
    assert comp.plan.kept == no_comp.plan.kept
    down = comp.model.model.layers[0].mlp.down_proj
    assert down.bias is not None and "model.layers.0.mlp.down_proj" in comp.plan.add_bias
    # compensation brings the pruned model closer to the dense one on the calibration data
    ref = m(**data[0]).logits
    err = lambda r: float((r.model(**data[0]).logits - ref).pow(2).mean().detach())
    assert err(comp) < err(no_comp)
    pk.save(comp, tmp_path)
    assert not comp.plan.hf_config_exact
    fresh, _ = build("llama_gqa")
    assert torch.equal(pk.load(tmp_path, model=fresh)(**x).logits, comp.model(**x).logits)
    assert torch.equal(pk.load(tmp_path)(**x).logits, comp.model(**x).logits)


def test_gqa_query_heads_evenly_within_groups(tmp_path):
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2)).eval()
    x = IDS()
    r = pk.prune(m, pk.Structured(ratio=0.5, gqa="query_heads"), example_inputs=x)
    from prunekit.models import hf
    sizes = hf.layer_sizes(r.model, m.config)
    assert sizes["heads"] == [4, 4] and sizes["kv_heads"] == [2, 2]       # KV heads kept, 2 of 4 per group
    for layer in r.model.model.layers:
        assert layer.self_attn.num_key_value_groups == 2
    # the same local query heads went in every group: kept q rows of group 0 and group 1 line up
    kept = r.plan.kept["model.layers.0.self_attn.q_proj.weight"]["0"]
    heads = sorted({i // 8 for i in kept})
    assert [h % 4 for h in heads[:2]] == [h % 4 for h in heads[2:]]
    pk.save(r, tmp_path)
    assert r.plan.hf_config_exact
    again = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert torch.equal(again(**x).logits, r.model(**x).logits)
    with pytest.raises(pk.ConfigError, match="gqa"):
        pk.Structured(gqa="heads")

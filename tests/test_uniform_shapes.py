"""Structured(uniform=True / tp_degree=) gives shapes a plain config expresses; saved config.json files always
pass transformers' own validation (a Gemma2 with 6 heads at hidden 128 used to make pk.save fail)."""
import pytest
import torch

import prunekit as pk

transformers = pytest.importorskip("transformers", reason="needs transformers")
from prunekit.models.hf import layer_sizes  # noqa: E402

IDS = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))


def llama(kv=4):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=kv, head_dim=8, max_position_embeddings=64)).eval()


def test_uniform_global_ranking_reloads_with_from_pretrained(tmp_path):
    free = pk.prune(llama(), pk.Structured(ratio=0.5, global_ranking=True), example_inputs={"input_ids": IDS})
    assert len(set(layer_sizes(free.model, free.model.config)["ffn"])) > 1     # uneven without uniform=True
    r = pk.prune(llama(), pk.Structured(ratio=0.5, global_ranking=True, uniform=True),
                 example_inputs={"input_ids": IDS})
    sizes = layer_sizes(r.model, r.model.config)
    assert all(len(set(v)) <= 1 for v in sizes.values()), sizes      # [] for MoE keys of a dense model
    assert sum(sizes["ffn"]) == pytest.approx(sum(layer_sizes(free.model, free.model.config)["ffn"]), abs=3)
    pk.save(r, tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, r.model(IDS).logits)


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_tp_degree_keeps_kv_heads_divisible(ratio):
    r = pk.prune(llama(), pk.Structured(ratio=ratio, uniform=True, tp_degree=2), example_inputs={"input_ids": IDS})
    kv = layer_sizes(r.model, r.model.config)["kv_heads"]
    assert all(k % 2 == 0 and k > 0 for k in kv), kv
    with pytest.raises(pk.ConfigError, match="tp_degree=3"):
        pk.prune(llama(), pk.Structured(ratio=0.3, tp_degree=3), example_inputs={"input_ids": IDS})
    with pytest.raises(pk.ConfigError, match="tp_degree"):
        pk.Structured(tp_degree=0)


def test_saved_config_passes_transformers_validation(tmp_path):
    torch.manual_seed(0)
    m = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=64)).eval()
    r = pk.prune(m, pk.Structured(ratio=0.25, uniform=True), example_inputs={"input_ids": IDS})
    assert set(layer_sizes(r.model, r.model.config)["heads"]) == {6}     # 128 % 6 != 0: transformers refuses it
    pk.save(r, tmp_path)
    transformers.AutoConfig.from_pretrained(str(tmp_path)).validate()
    again = pk.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, r.model(IDS).logits, rtol=0, atol=0)


# ------------------------------------------------------------------ every HF family of test_hf / test_hf_any
import test_hf  # noqa: E402
import test_hf_any  # noqa: E402

FAMILIES = {**{k: test_hf.build for k in test_hf.FAMILIES}, **{k: test_hf_any.build for k in test_hf_any.FAMILIES}}
HEADS = {  # the same encoders with a task head: their outputs no longer carry the hidden size, so it can shrink
    "bert_cls": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_labels=3)),
    "deberta_v2_cls": lambda: transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3)),
}
# the config cannot express the uniform result; why:
NOT_EXPRESSIBLE = {
    "bert": "head size = hidden / heads and BertModel's outputs are its hidden states (the hidden size stays)",
    "clip": "head size = hidden / heads and CLIPModel returns both towers' hidden states",
    "deberta_v2": "head size = hidden / heads and DebertaV2Model's outputs are its hidden states",
    "convnext": "CNN stage widths: hidden_sizes hold one width per stage, block-internal widths are fixed ratios",
    "resnet": "CNN: bottleneck widths are hidden_sizes / 4, one number per stage",
    "swin": "per-stage hidden sizes are embed_dim * 2**stage: one pruned stage width cannot be written",
    "bloom": "BLOOM's FFN is always 4 * hidden_size (no config field for it)",
}
HIDDEN_FOLLOWS = {"gpt2", "opt", "falcon_gqa", "falcon_mha", "gpt_neox", "bert_cls", "deberta_v2_cls"}


def _build(name):
    if name in HEADS:
        torch.manual_seed(0)
        return HEADS[name]().eval(), {"input_ids": torch.randint(0, 100, (2, 8))}
    return FAMILIES[name](name)


FAST = {"gpt2", "opt", "bert", "bert_cls", "falcon_mha", "llama_gqa"}     # the rest: make test-all


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted({*FAMILIES, *HEADS})])
def test_uniform_from_pretrained_every_family(name, tmp_path):
    import warnings
    m, x = _build(name)
    base = m.config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = pk.prune(m, pk.Structured(ratio=0.5, importance="l2", uniform=True), example_inputs=x)
    sizes = layer_sizes(r.model, base)
    if name not in ("swin", "convnext", "resnet"):       # staged models: widths differ per stage by design
        assert all(len(set(sizes[k])) <= 1 for k in ("heads", "kv_heads", "ffn")), sizes
    pk.save(r, tmp_path)
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path))     # transformers' own validation
    cfg.validate()
    with torch.no_grad():
        y = test_hf_any.outputs(r.model(**x))
        assert all(torch.equal(a, b) for a, b in zip(test_hf_any.outputs(pk.load(tmp_path)(**x)), y))
    if name in NOT_EXPRESSIBLE:
        assert not r.plan.hf_config_exact, NOT_EXPRESSIBLE[name]
        if name in ("bert", "clip", "deberta_v2"):
            assert any("pk.load" in str(w.message) and "uniform=True" in str(w.message) for w in caught)
        return
    assert r.plan.hf_config_exact
    if name in HIDDEN_FOLLOWS:       # heads halved, hidden halved with them: hidden / heads is the old head size
        assert cfg.hidden_size == base.hidden_size // 2
        assert cfg.hidden_size // sizes["heads"][0] == base.hidden_size // base.num_attention_heads
    again = type(m).from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        got = test_hf_any.outputs(again(**x))
    assert len(got) == len(y) and all(torch.equal(a, b) for a, b in zip(got, y))


@pytest.mark.parametrize("name", ["gpt2", "opt", "falcon_mha"])
def test_hidden_follows_heads_at_any_ratio(name, tmp_path):
    """3 of 4 heads and 70% of the FFN: hidden = 3 * head_dim, and the FFN width is written even where the
    dense config left it implicit (GPT-2's n_inner=None means 4 * hidden, which 180 is not)."""
    m, x = _build(name)
    hd = m.config.hidden_size // m.config.num_attention_heads
    r = pk.prune(m, pk.Structured(ratio=0.3, importance="l2", uniform=True), example_inputs=x)
    sizes = layer_sizes(r.model, m.config)
    assert sizes["heads"] == [3, 3] and r.plan.hf_config_exact
    pk.save(r, tmp_path)
    again = type(m).from_pretrained(str(tmp_path)).eval()
    assert again.config.hidden_size == 3 * hd
    with torch.no_grad():
        assert torch.equal(again(**x).logits, r.model(**x).logits)

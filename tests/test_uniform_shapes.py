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

"""Structured(importance="auto") on a causal LM: Taylor on the LM loss with data, a plain warning without."""
import warnings

import pytest
import torch

import prunekit as pk
from prunekit.structured.importance import Taylor

transformers = pytest.importorskip("transformers", reason="needs transformers for a tiny Llama")
torch.set_num_threads(1)


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()


def test_llm_default_importance_is_data_aware_with_data():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    cfg = pk.Structured(ratio={".*mlp.*": 0.25})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        r = pk.prune(tiny_llama(), cfg, example_inputs={"input_ids": ids[:1]}, data=[ids, {"input_ids": ids}])
    assert isinstance(r.config.importance, Taylor) and "warnings" not in r.stats
    mag = pk.prune(tiny_llama(), pk.Structured(ratio={".*mlp.*": 0.25}, importance="l2"),
                   example_inputs={"input_ids": ids[:1]})
    assert r.model.model.layers[0].mlp.up_proj.out_features == mag.model.model.layers[0].mlp.up_proj.out_features == 48
    assert r.plan.kept != mag.plan.kept                     # a different score picks different neurons


def test_llm_default_without_data_warns_plainly():
    ids = torch.randint(0, 64, (1, 16))
    with pytest.warns(UserWarning, match="magnitude.*wrecks LLM widths.*data="):
        r = pk.prune(tiny_llama(), pk.Structured(ratio={".*mlp.*": 0.25}), example_inputs={"input_ids": ids})
    assert "wrecks LLM widths" in r.summary()
    assert pk.Structured().importance == "auto"

"""pk.save / pk.load of a model pruned in width (pk.Structured) and then in depth (pk.Layers).

The depth plan records the config the model carried, which for per-layer widths is still the unpruned one: the
saved config.json must not claim those uniform sizes, and pk.load(dir) must take the widths from the tensors.
"""
import json

import pytest
import torch

import prunekit as pk

transformers = pytest.importorskip("transformers", reason="needs transformers")


def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                                   head_dim=8, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("width", [dict(ratio=0.5, global_ranking=True),
                                   dict(ratio=0.25, prune_hidden=True, global_ranking=True)])
def test_width_then_depth_reloads_exactly(tmp_path, width):
    r = pk.prune(tiny(), pk.Structured(**width), example_inputs={"input_ids": IDS})
    r = pk.prune(r.model, pk.Layers(n=1), data=[{"input_ids": IDS}])
    ffn = {b.mlp.up_proj.out_features for b in r.model.model.layers}
    pk.save(r, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if len(ffn) > 1:           # per-layer widths: config.json must say it cannot express them
        assert "prunekit_note" in cfg
    else:
        assert cfg["intermediate_size"] == ffn.pop() and cfg["num_hidden_layers"] == 3
    again = pk.load(tmp_path)
    assert len(again.model.layers) == 3
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, r.model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("steps", ["width", "width+depth"])
def test_bare_model_saved_after_recovery_keeps_its_plan(tmp_path, steps):
    """pk.recover trains the pruned model in place; pk.save(model) -- not the PruneResult -- must still write the
    plan, so pk.load(dir) rebuilds per-layer widths with no original model at hand."""
    r = pk.prune(tiny(), pk.Structured(ratio=0.5, global_ranking=True), example_inputs={"input_ids": IDS})
    if steps == "width+depth":
        r = pk.prune(r.model, pk.Layers(n=1), data=[{"input_ids": IDS}])
    docs = [torch.randint(1, 97, (24,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    before = {k: v.clone() for k, v in r.model.state_dict().items()}
    model = pk.recover(r.model, data=docs, tokens=64, seq_len=16, batch_size=2, loss="task", quiet=True)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())    # it did train
    pk.save(model.eval(), tmp_path / "bare")
    pk.save(r, tmp_path / "result")
    plan = json.loads((tmp_path / "bare" / "plan.json").read_text())
    assert plan == json.loads((tmp_path / "result" / "plan.json").read_text()) and plan["hf_class"] == "LlamaForCausalLM"
    again = pk.load(tmp_path / "bare")
    assert [b.mlp.up_proj.out_features for b in again.model.layers] == \
        [b.mlp.up_proj.out_features for b in model.model.layers]
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    pk.save(again, tmp_path / "resaved")               # the loaded model carries the plan too
    assert json.loads((tmp_path / "resaved" / "plan.json").read_text()) == plan


def test_hidden_not_a_multiple_of_heads_then_depth(tmp_path):
    """Llama keeps an explicit head_dim, so hidden 56 with 6 heads of 8 is a real model -- but transformers'
    validator refuses that config ('hidden size is not a multiple of the number of attention heads'). A depth prune
    after it must still save (recording the unpruned architecture) and reload exactly."""
    ratio = {".*self_attn.*": 0.25, ".*mlp.*": 0.5, "model.embed_tokens": 0.125}
    r = pk.prune(tiny(), pk.Structured(ratio=ratio, prune_hidden=True), example_inputs={"input_ids": IDS},
                 data=[IDS])
    heads = {b.self_attn.q_proj.out_features // 8 for b in r.model.model.layers}
    hidden = r.model.model.embed_tokens.embedding_dim
    assert hidden == 56 and heads == {6} and hidden % 6       # the case transformers' validator refuses
    r = pk.prune(r.model, pk.Layers(n=1), data=[{"input_ids": IDS}])
    pk.save(r, tmp_path)
    assert "prunekit_note" in json.loads((tmp_path / "config.json").read_text())
    again = pk.load(tmp_path)
    assert len(again.model.layers) == 3 and again.model.embed_tokens.embedding_dim == 56
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, r.model(IDS).logits, rtol=0, atol=0)

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

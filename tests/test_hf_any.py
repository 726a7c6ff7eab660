"""Hugging Face models that are not plain text transformers: vision and multimodal towers, per-stage list
configs, read-only config properties, fused qkv projections. Tiny random-init configs, no downloads."""
import warnings

import pytest
import torch

import prunekit as pk

transformers = pytest.importorskip("transformers")
import transformers as T  # noqa: E402

from prunekit.models import hf  # noqa: E402

IDS = lambda: {"input_ids": torch.randint(0, 100, (2, 8))}
PIX = lambda s: (lambda: {"pixel_values": torch.randn(2, 3, s, s)})
TXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)

FAMILIES = {
    "clip": (lambda: T.CLIPModel(T.CLIPConfig(
        text_config=dict(intermediate_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **TXT),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=16)),
        lambda: {"input_ids": torch.randint(0, 100, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32)}),
    "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_labels=3)), PIX(64)),
    "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
        hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], embedding_size=16, num_labels=3)), PIX(64)),
    "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
        num_labels=3)), PIX(32)),
    "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=32, patch_size=8)), PIX(32)),
    "falcon_gqa": (lambda: T.FalconForCausalLM(T.FalconConfig(new_decoder_architecture=True, num_kv_heads=2,
                                                              **TXT)), IDS),
    "falcon_mha": (lambda: T.FalconForCausalLM(T.FalconConfig(new_decoder_architecture=False, multi_query=False,
                                                              **TXT)), IDS),
    "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4)), IDS),
    "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(intermediate_size=64, max_position_embeddings=32,
                                                              **TXT)), IDS),
    "deberta_v2": (lambda: T.DebertaV2Model(T.DebertaV2Config(intermediate_size=64, max_position_embeddings=32,
                                                              **TXT)), IDS),
}
DECODERS = {"falcon_gqa", "falcon_mha", "bloom", "gpt_neox"}
# BLOOM's heads stay: its ALiBi slopes are computed from num_heads (a full-size tensor with no ids added to the
# scores in baddbmm), so fewer heads would change the slopes of the heads that remain
NO_HEADS = {"convnext", "resnet", "bloom"}


def build(name):
    torch.manual_seed(0)
    make, inp = FAMILIES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make().eval(), inp()


def outputs(out):
    """Every tensor of a model output (CLIP returns both towers' embeddings and the similarity logits)."""
    from torch.utils._pytree import tree_flatten
    out = out.to_tuple() if hasattr(out, "to_tuple") else out
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def assert_same(a, b):
    a, b = outputs(a), outputs(b)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


PARAMS = sorted(FAMILIES)


@pytest.mark.parametrize("name", PARAMS)
def test_prune_save_reload(name, tmp_path):
    m, x = build(name)
    with torch.no_grad():
        dense = m(**x)
        r0 = pk.prune(m, pk.Structured(ratio=0.0, importance="l2"), example_inputs=x)
        assert_same(r0.model(**x), dense)
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # nothing may be auto-ignored
            r = pk.prune(m, pk.Structured(ratio=0.5, importance="l2"), example_inputs=x)   # no data: magnitude
        p = r.model
        assert pk.count_params(p) < 0.8 * pk.count_params(m)
        y = p(**x)
        assert [t.shape for t in outputs(y)] == [t.shape for t in outputs(dense)]
    before = hf.layer_sizes(m, m.config)
    after = hf.layer_sizes(p, m.config)
    if name not in NO_HEADS:                    # every attention block lost heads, and attributes agree
        assert before["heads"] and len(after["heads"]) == len(before["heads"])
        assert all(a < b for a, b in zip(after["heads"], before["heads"])), (before, after)
        for _, mod, _, _ in hf.attention_modules(p):
            for attr in hf.HEAD_ATTRS:
                if isinstance(getattr(mod, attr, None), int):
                    assert getattr(mod, attr) in after["heads"]
    pk.save(r, tmp_path)
    with torch.no_grad():
        assert_same(pk.load(tmp_path)(**x), y)
        fresh, _ = build(name)
        assert_same(pk.load(tmp_path, model=fresh)(**x), y)
        if r.plan.hf_config_exact:
            again = type(m).from_pretrained(str(tmp_path)).eval()
            assert_same(again(**x), y)
    if name in DECODERS:
        g = p.generate(x["input_ids"][:1], max_new_tokens=4, do_sample=False)
        assert g.shape == (1, 12)
        with torch.no_grad():      # greedy decoding with the KV cache equals recomputing the whole sequence
            assert int(p(input_ids=g[:, :-1]).logits[0, -1].argmax()) == int(g[0, -1])


def test_clip_rewrites_both_sub_configs(tmp_path):
    """FFN widths of both towers pruned: the text and vision sub-configs say so and plain from_pretrained
    rebuilds the model."""
    m, x = build("clip")
    r = pk.prune(m, pk.Structured(ratio={r".*mlp\..*": 0.5}), example_inputs=x)
    cfg = r.model.config
    assert cfg.text_config.intermediate_size == 32 and cfg.vision_config.intermediate_size == 32
    assert r.model.text_model.config is cfg.text_config          # modules see the rewritten sub-configs
    assert r.plan.hf_config_exact
    pk.save(r, tmp_path)
    again = T.CLIPModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert_same(again(**x), r.model(**x))


def test_swin_per_stage_heads_list():
    """Swin stores heads per stage (`num_heads` is a list): the rewritten config keeps one entry per stage."""
    m, x = build("swin")
    r = pk.prune(m, pk.Structured(ratio={r".*attention\..*": 0.5}), example_inputs=x)
    cfg = hf.pruned_config(r.model, m.config)
    assert cfg is not None and list(cfg.num_heads) == hf.layer_sizes(r.model, m.config)["heads"] == [1, 2]


def test_falcon_head_dim_property_is_derived_not_set():
    m, _ = build("falcon_gqa")
    assert not hf._settable(m.config, "head_dim") and hf.head_dim_of(m.config) == 8
    cfg = hf.pruned_config(m, m.config)
    assert cfg.num_attention_heads == 4 and cfg.num_kv_heads == 2


def test_models_without_input_embeddings():
    """CNN and dual-tower models have no single token table: the residual-stream lookup still works."""
    m, x = build("convnext")
    with pytest.raises(NotImplementedError):
        m.get_input_embeddings()
    assert hf._embedding_width(m) is None
    members = hf._stream_members(m)
    assert ("convnext.embeddings.patch_embeddings.weight", 0) in members
    clip, _ = build("clip")
    names = {n for n, _ in hf._stream_members(clip)}
    assert "text_model.embeddings.token_embedding.weight" in names
    assert "vision_model.embeddings.patch_embedding.weight" in names

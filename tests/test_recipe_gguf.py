"""A recipe that ends with an `export: {format: gguf}` stage: tiny random Llama, prune -> evaluate -> export GGUF
(dense and pruned, same settings) -> `prunekit report` with the llama.cpp rows (file sizes; perplexity and
prefill/decode tokens/s in llama.cpp when llama-cpp-python is installed, else a row saying it is not)."""
import json

import pytest
import torch

import prunekit as pk
from prunekit.run.pipeline import load_recipe, run_pipeline

pytest.importorskip("gguf", reason="the GGUF export writes with the 'gguf' package (pip install gguf)")
transformers = pytest.importorskip("transformers", reason="needs transformers")
pytest.importorskip("tokenizers", reason="needs tokenizers")

from test_export_gguf import tiny_tokenizer  # noqa: E402

TOK = tiny_tokenizer()
V = len(TOK)


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128)).eval()


def ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (2, 32), generator=g) for _ in range(n)]


def recipe(tok_dir, **export):
    return {"seed": 0, "calibration_batches": 1, "stages": [
        {"evaluate": {"metric": "perplexity"}},
        {"prune": {"type": "Structured", "ratio": 0.5, "uniform": True}},
        {"evaluate": {"metric": "perplexity"}},
        {"export": {"format": "gguf", "dtype": "f32", "tokenizer": str(tok_dir), "windows": 2, "prompt_tokens": 16,
                    "decode_tokens": 4, "reps": 1, "threads": 1, **export}}]}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    TOK.save_pretrained(str(d))
    return d


def _run(tmp_path, tok_dir, **export):
    res = run_pipeline(llama(), recipe(tok_dir, **export), train=ids(2, 0), val=ids(2, 1), out=tmp_path / "r",
                       quiet=True)
    assert res.status == "completed", res.message
    assert pk.cli.main(["report", str(res.run_dir)]) == 0
    report = res.run_dir / "report"
    return res.run_dir, json.loads((report / "metrics.json").read_text()), (report / "report.html").read_text()


def test_recipe_exports_gguf_and_report_has_llamacpp_rows(tmp_path, tok_dir):
    run, data, page = _run(tmp_path, tok_dir)
    sec = data["llamacpp"]
    rows = {r["variant"]: r for r in sec["rows"] if "dtype" in r}
    assert set(rows) == {"dense", "pruned"}
    for v, r in rows.items():
        assert (run / "export" / f"{v}.f32.gguf").stat().st_size == r["size_bytes"]
        assert r["file"] in page
    assert 0.2 < rows["pruned"]["size_ratio"] < 0.9            # heads and FFN halved, embeddings kept
    assert "llama.cpp (GGUF export)" in page
    if not sec["installed"]:
        assert any("not installed" in r.get("note", "") for r in sec["rows"]) and "not installed" in page
        pytest.skip("llama.cpp engine not installed: pip install llama-cpp-python (rows without measurements)")
    for r in rows.values():        # F32 file, F32 KV cache: llama.cpp's perplexity is PyTorch's on the same windows
        assert r["perplexity"] == pytest.approx(r["pytorch_perplexity"], rel=1e-3)
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    assert rows["pruned"]["decode_speedup"] == pytest.approx(rows["pruned"]["decode_tok_s"] / rows["dense"]["decode_tok_s"])
    assert "prefill_speedup" in rows["pruned"] and "decode_speedup" not in rows["dense"]


def test_without_llama_cpp_the_report_says_so(tmp_path, tok_dir, monkeypatch):
    import prunekit.run.export as E
    monkeypatch.setattr(E, "_has", lambda m: m != "llama_cpp" and E.importlib.util.find_spec(m) is not None)
    run, data, page = _run(tmp_path, tok_dir)
    assert data["llamacpp"]["installed"] is False
    assert [r["variant"] for r in data["llamacpp"]["rows"]] == ["dense", "pruned", "llama.cpp"]
    assert E.NOT_INSTALLED in page and all("perplexity" not in r for r in data["llamacpp"]["rows"])


def test_export_stage_checks(tmp_path, tok_dir):
    with pytest.raises(pk.ConfigError, match="export stages must come last"):
        load_recipe({"stages": [{"export": {"format": "gguf"}}, {"evaluate": {"metric": "perplexity"}}]})
    with pytest.raises(pk.ConfigError, match="format"):
        load_recipe({"stages": [{"evaluate": {}}, {"export": {"format": "tflite"}}]})
    with pytest.raises(pk.ConfigError, match="quant"):
        load_recipe({"stages": [{"evaluate": {}}, {"export": {"format": "gguf", "quant": "q2"}}]})
    with pytest.raises(pk.ConfigError, match="only export stages"):
        load_recipe({"stages": [{"export": {}}]})
    r = recipe(tok_dir)
    r["stages"][-1]["export"]["tokenizer"] = None
    with pytest.raises(pk.ExportError, match="no tokenizer"):        # before anything runs or is written
        run_pipeline(llama(), r, train=ids(2, 0), val=ids(2, 1), out=tmp_path / "r", quiet=True)
    assert not (tmp_path / "r" / "config.json").exists()


def test_llm_recover_recipe_export_example_parses():
    """The commented export stage at the end of recipes/llm_recover.yaml is a valid stage once uncommented."""
    import yaml
    from pathlib import Path
    text = (Path(pk.__file__).parent / "recipes" / "llm_recover.yaml").read_text()
    assert "  # - export: {format: gguf" in text
    r = load_recipe(yaml.safe_load(text.replace("  # - export:", "  - export:")))
    (e,) = r.exports()
    assert (e.format, e.dtype, e.quant) == ("gguf", "f16", "q8_0") and len(r.steps()) == len(load_recipe(
        yaml.safe_load(text)).steps())


def test_cli_recipe_takes_the_tokenizer_from_the_model_dir(tmp_path, monkeypatch):
    """prunekit prune --model HF_DIR with an export stage and no tokenizer: key uses HF_DIR's tokenizer."""
    hf_dir = tmp_path / "hf"
    llama().save_pretrained(str(hf_dir))
    TOK.save_pretrained(str(hf_dir))
    (tmp_path / "lm_batches_mod.py").write_text(
        "import torch\n"
        "def batches(split, limit=None, **_):\n"
        f"    g = torch.Generator().manual_seed(0 if split == 'train' else 1)\n"
        f"    return [torch.randint(0, {V}, (2, 32), generator=g) for _ in range(2)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = recipe(tok_dir=None, measure=False)
    del r["stages"][-1]["export"]["tokenizer"]
    (tmp_path / "r.yaml").write_text(json.dumps(r))                 # JSON is YAML
    run = tmp_path / "run"
    assert pk.cli.main(["prune", "--model", str(hf_dir), "--data", "lm_batches_mod:batches", "--recipe",
                        str(tmp_path / "r.yaml"), "--out", str(run), "--quiet"]) == 0
    assert pk.cli.main(["report", str(run)]) == 0
    rows = json.loads((run / "report" / "metrics.json").read_text())["llamacpp"]["rows"]
    assert [(x["variant"], x["architecture"]) for x in rows] == [("dense", "llama"), ("pruned", "llama")]
    from prunekit.export.gguf_vocab import tokenizer_fields
    import gguf as G
    toks = G.GGUFReader(str(run / "export" / "pruned.f32.gguf")).fields["tokenizer.ggml.tokens"]
    written = [bytes(toks.parts[i]).decode() for i in toks.data]
    assert len(written) == V and written == list(tokenizer_fields(str(hf_dir), V)["tokenizer.ggml.tokens"][0])


def test_tokenizer_resolution_order(tmp_path, tok_dir):
    from prunekit.run.export import Export, resolve_tokenizer
    run = tmp_path / "run"
    src = tmp_path / "src.gguf"
    assert resolve_tokenizer(Export(tokenizer="a.gguf"), run, {"tokenizer": str(src)}) == "a.gguf"
    assert resolve_tokenizer(Export(), run, {"tokenizer": str(src), "model": str(tok_dir)}) == str(src)
    assert resolve_tokenizer(Export(), run, {"model": str(tok_dir)}) == str(tok_dir)
    TOK.save_pretrained(str(run / "model"))
    assert resolve_tokenizer(Export(), run, {"model": str(tok_dir)}) == str(run / "model")
    assert resolve_tokenizer(Export(), tmp_path / "other", {"model": "smollm2-135m"}) is None
    from prunekit.zoo import GGUF_SOURCES
    assert "smollm2-135m" in GGUF_SOURCES        # prunekit prune --model smollm2-135m: describe["tokenizer"]


def test_recipe_exports_onnx(tmp_path):
    pytest.importorskip("onnx", reason="format: onnx needs onnx (pip install 'prunekit[export]')")
    pytest.importorskip("onnxruntime", reason="format: onnx checks the file in ONNX Runtime")
    from test_pipeline import Net, batches
    r = {"stages": [{"prune": {"type": "Structured", "ratio": 0.5}}, {"export": {"format": "onnx"}}]}
    res = run_pipeline(Net(), r, train=batches(), val=batches(seed=1), out=tmp_path / "r", quiet=True)
    assert res.status == "completed" and (res.run_dir / "export" / "pruned.onnx").stat().st_size > 0
    notes = json.loads((res.run_dir / "metrics.json").read_text())["notes"]
    assert any(n.startswith("ONNX export:") for n in notes) and "llamacpp" not in json.loads(
        (res.run_dir / "metrics.json").read_text())

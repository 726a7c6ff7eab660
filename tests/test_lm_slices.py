"""Long-tail LM evaluation: packaged slices (data/lm.py), per-slice perplexity CIs, log-scale slice flags."""
import numpy as np
import pytest
import torch

import prunekit as pk
from prunekit.data import lm
from prunekit.evaluate.metrics import PERPLEXITY
from prunekit.evaluate.result import EvalResult

torch.set_num_threads(1)
needs_fortunes = pytest.mark.skipif(not (lm.FORTUNES / "de").exists(),
                                    reason="needs Debian fortunes-de/-ru (apt-get install -y fortunes-de fortunes-ru)")


class CharTok:
    """One id per character (mod 64): enough to cut windows without a real tokenizer."""
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 64 for c in text]}


@needs_fortunes
def test_slices_load_with_tags_and_evaluate_per_slice():
    b = pk.data.load("lm-slices", tokenizer=CharTok(), length=32, windows=3, slices=("python", "de", "ru"),
                     batch_size=4)
    ids, tags = b[0]
    assert ids.shape == (4, 32) and ids.dtype == torch.long
    assert [t for _, ts in b for t in ts] == ["python", "de", "ru"] * 3      # interleaved: any prefix has all
    assert list(b[0][1]) == ["python", "de", "ru", "python"]
    assert lm.skipped_files == []                       # every packaged file decoded as UTF-8
    ru = next(iter(lm.lm_slice_texts("ru")))
    assert any("\u0400" <= c <= "\u04ff" for c in ru)   # Cyrillic, not mojibake
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).eval()
    res = pk.evaluate(model, b, metric="perplexity")
    assert set(res.slices) == {"python", "de", "ru"} and all(s["n"] == 3 for s in res.slices.values())
    for s in res.slices.values():
        assert s["ci"][0] <= s["value"] <= s["ci"][1]


def test_unknown_slice_and_missing_tokenizer_are_explained():
    with pytest.raises(pk.errors.DataError, match="known"):
        next(lm.lm_slice_texts("klingon"))
    with pytest.raises(pk.errors.DataError, match="tokenizer"):
        lm.lm_slices(None)


def _ppl_result(log_ppl_per_slice, n=30, seed=0):
    """EvalResult of windows of 10 tokens whose per-token NLL is log(ppl) plus noise, tagged by slice."""
    rng = np.random.default_rng(seed)
    rows, tags = [], []
    for tag, lp in log_ppl_per_slice.items():
        for _ in range(n):
            rows.append([10 * (lp + rng.normal(0, 0.05)), 10])
            tags.append(tag)
    rows = np.array(rows)
    slices = {t: {"n": n, "value": PERPLEXITY.aggregate(rows[[i for i, x in enumerate(tags) if x == t]])}
              for t in log_ppl_per_slice}
    return EvalResult("perplexity", False, PERPLEXITY.aggregate(rows), ["nll_sum", "n_tokens"], rows, tags, slices,
                      aggregate_name="perplexity")


def test_flags_use_log_perplexity_rise():
    # every slice doubles its perplexity (same log rise) except "code", whose log-perplexity rises 4x as much
    ref = _ppl_result({"en": np.log(10), "rare": np.log(400), "code": np.log(5)})
    pru = _ppl_result({"en": np.log(20), "rare": np.log(800), "code": np.log(5) + 4 * np.log(2)}, seed=1)
    cmp = pk.compare_slices(ref, pru)
    assert cmp.params["scale"] == "log" and cmp.flagged == ["code"]
    assert "rare" in pk.compare_slices(ref, pru, log=False).flagged    # linear ppl would blame the rare slice


def test_report_plots_log_perplexity_rise():
    pytest.importorskip("matplotlib")
    from prunekit.report.plots import slice_plot
    ref = _ppl_result({"en": np.log(10), "code": np.log(5)})
    pru = _ppl_result({"en": np.log(20), "code": np.log(40)}, seed=1)
    png = slice_plot(pk.compare_slices(ref, pru).to_dict())
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

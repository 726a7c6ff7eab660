"""Reports from run directories: complete and interrupted runs, and a real headless-browser render."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from prunekit.errors import ReportError
from prunekit.evaluate import compare_slices, from_callable
from prunekit.evaluate.core import evaluate
from prunekit.report import RunRecorder, load_run, width_fractions
from prunekit.report.write import write_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def _comparison():
    """A real slice comparison where slice 'c3' is destroyed by pruning."""
    g = torch.Generator().manual_seed(0)
    tags = [f"c{i % 6}" for i in range(360)] + ["rare"] * 5
    ref = (torch.rand(365, generator=g) < 0.9).double()
    pru = ref * (torch.rand(365, generator=g) > 0.03).double()
    pru[[i for i, t in enumerate(tags) if t == "c3"]] = 0
    idx = torch.arange(365)
    ev = lambda s: evaluate(torch.nn.Identity(), [(idx, idx)], metric=from_callable(lambda m, b: s[b[0]], "accuracy"),
                            slices=tags)
    return compare_slices(ev(ref), ev(pru), n_boot=200)


def _record(run_dir, finish=True, sections=("summary", "steps", "slices", "widths")):
    rec = RunRecorder(run_dir, run={"name": "mlp-demo", "method": "Structured(ratio=0.5)"})
    if "steps" in sections:
        for step, (sp, q) in enumerate([(1.0, 0.91), (1.3, 0.905), (1.7, 0.89), (2.2, 0.86), (2.9, 0.80)]):
            rec.log_step(step=step, speedup=sp, quality=q, params=int(1e6 / sp))
    if "summary" in sections:
        rec.set("summary", {"metric": "accuracy", "higher_is_better": True, "batch_size": 1, "rows": [
            {"variant": "dense", "quality": 0.91, "latency_ms": 4.0, "memory_bytes": 8e6, "size_bytes": 4e6,
             "params": 1_000_000},
            {"variant": "pruned", "quality": 0.86, "latency_ms": 1.8, "memory_bytes": 4e6, "size_bytes": 2e6,
             "params": 450_000},
            {"variant": "pruned+int8", "quality": 0.855, "latency_ms": 1.1, "memory_bytes": 3e6,
             "size_bytes": 0.6e6, "params": 450_000}]})
    if "slices" in sections:
        rec.set("slices", _comparison())
    if "widths" in sections:
        rec.set("widths", [{"name": f"blocks.{i}.mlp", "original": 512, "kept": 512 - 60 * i} for i in range(6)])
    if finish:
        rec.finish()
    return rec


def test_complete_run_report_has_all_sections(tmp_path):
    _record(tmp_path / "run")
    paths = write_report(str(tmp_path / "run"), str(tmp_path / "out"))
    page = open(paths["html"]).read()
    assert "COMPLETE" in page and "INCOMPLETE" not in page
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert '<tr class="flagged"><td class="">c3</td>' in page and "Flagged: c3" in page
    assert "too few to judge" in page and "Overall accuracy:" in page
    assert "2.22x" in page and "3.64x" in page  # speedups 4.0/1.8 and 4.0/1.1
    m = json.load(open(paths["json"]))
    assert m["complete"] is True and m["missing"] == []
    assert m["summary"]["rows"][2]["size_ratio"] == pytest.approx(0.15)
    md = open(paths["md"]).read()
    assert "**flagged**" in md and "![quality vs speedup](plots/curve.png)" in md
    assert os.path.getsize(tmp_path / "out" / "plots" / "widths.png") > 5000


def test_interrupted_run_is_marked_incomplete_and_shows_what_exists(tmp_path):
    _record(tmp_path / "run", finish=False, sections=("steps",))
    data = load_run(str(tmp_path / "run"))
    assert data["complete"] is False and set(data["missing"]) == {"summary", "slices", "widths"}
    paths = write_report(str(tmp_path / "run"), str(tmp_path / "out"))
    page = open(paths["html"]).read()
    assert "INCOMPLETE" in page and "no COMPLETE marker" in page and "missing sections: summary" in page
    assert page.count("data:image/png;base64,") == 1  # the curve from the steps that were logged
    assert "No per-slice evaluation recorded" in page
    assert "INCOMPLETE" in open(paths["md"]).read()


def test_restarted_recorder_clears_old_complete_marker(tmp_path):
    _record(tmp_path / "run", sections=())
    assert os.path.exists(tmp_path / "run" / "COMPLETE")
    RunRecorder(tmp_path / "run")
    assert not os.path.exists(tmp_path / "run" / "COMPLETE")


def test_dict_input_and_bad_inputs(tmp_path):
    paths = write_report({"steps": [{"step": 0, "speedup": 1.0, "quality": 0.5}]}, str(tmp_path / "o"))
    assert "INCOMPLETE" in open(paths["html"]).read()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{\"steps\": [")
    with pytest.raises(ReportError, match="not valid JSON"):
        write_report(str(tmp_path / "broken"), str(tmp_path / "o2"))
    with pytest.raises(ReportError, match="does not exist"):
        write_report(str(tmp_path / "nope"), str(tmp_path / "o3"))
    with pytest.raises(ReportError, match="needs step, speedup and quality"):
        RunRecorder(tmp_path / "r", env=False).log_step(step=1, quality=0.3)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium); "
                                             "cannot render report.html in a browser")
def test_report_renders_in_headless_chromium(tmp_path):
    _record(tmp_path / "run")
    paths = write_report(str(tmp_path / "run"), str(tmp_path / "out"))
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2600", f"--screenshot={shot}",
           "file://" + os.path.abspath(paths["html"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (rc={proc.returncode}): {proc.stderr[-2000:]}"
    import matplotlib.image as mpimg
    img = mpimg.imread(str(shot))[..., :3]
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    non_white = (img.min(axis=-1) < 0.95).mean()
    assert non_white > 0.03, f"screenshot is almost blank ({non_white:.1%} non-white pixels)"
    reds = ((img[..., 0] > 0.75) & (img[..., 1] < 0.35) & (img[..., 2] < 0.35)).sum()
    assert reds > 50, "the flagged slice bar / badge colours did not render"
    assert len(np.unique((img * 15).astype(int).reshape(-1, 3), axis=0)) > 50  # plots, not a flat page
    if os.environ.get("PRUNEKIT_KEEP_SCREENSHOT"):  # to look at it by eye
        shutil.copy(shot, os.environ["PRUNEKIT_KEEP_SCREENSHOT"])


def test_width_fractions_group_by_kind_with_totals():
    widths = [{"name": f"layer {i} heads", "kind": "heads", "original": 12, "kept": 12 - 2 * i} for i in range(3)]
    widths += [{"name": f"layer {i} FFN", "kind": "FFN neurons", "original": 1536, "kept": 1536 - 256 * i}
               for i in range(3)]
    widths.insert(1, {"name": "fc", "original": 10, "kept": 10})           # no kind: "units"
    w = width_fractions(widths)
    assert [x["kind"] for x in w["layers"]] == ["heads"] * 3 + ["units"] + ["FFN neurons"] * 3
    assert [x["name"] for x in w["layers"]][:3] == ["layer 0 heads", "layer 1 heads", "layer 2 heads"]
    assert [x["fraction"] for x in w["layers"] if x["kind"] == "heads"] == pytest.approx([1.0, 10 / 12, 8 / 12])
    # heads and FFN widths differ by 100x, their fractions are on the same scale
    assert all(0 < x["fraction"] <= 1 for x in w["layers"])
    kinds = {k["kind"]: k for k in w["kinds"]}
    assert kinds["heads"]["original"] == 36 and kinds["heads"]["kept"] == 30
    assert kinds["FFN neurons"]["fraction"] == pytest.approx((3 * 1536 - 768) / (3 * 1536))
    assert kinds["units"]["layers"] == 1 and kinds["units"]["fraction"] == 1.0
    # the dict forms give the same numbers
    assert width_fractions({"a": [8, 4]})["layers"][0]["fraction"] == 0.5
    assert width_fractions({"a": {"original": 8, "kept": 2, "kind": "channels"}})["kinds"][0]["kind"] == "channels"
    with pytest.raises(ReportError, match="kept must not exceed original"):
        width_fractions([{"name": "x", "original": 4, "kept": 5}])


def test_widths_report_plots_fractions_and_tables_counts(tmp_path):
    rec = _record(tmp_path / "run", finish=False, sections=("summary", "steps", "slices"))
    rec.set("widths", [{"name": "layer 0 heads", "kind": "heads", "original": 12, "kept": 6},
                       {"name": "layer 0 FFN", "kind": "FFN neurons", "original": 1536, "kept": 1152}])
    rec.finish()
    paths = write_report(str(tmp_path / "run"), str(tmp_path / "out"))
    m = json.load(open(paths["json"]))
    assert [(w["kind"], w["fraction"]) for w in m["widths"]] == [("heads", 0.5), ("FFN neurons", 0.75)]
    assert {k["kind"]: (k["kept"], k["original"]) for k in m["width_kinds"]} == \
        {"heads": (6, 12), "FFN neurons": (1152, 1536)}
    page, md = open(paths["html"]).read(), open(paths["md"]).read()
    for text in (page, md):
        assert "kept fraction" in text and "50.0%" in text and "75.0%" in text and "1,152" in text
    import matplotlib.image as mpimg
    img = mpimg.imread(str(tmp_path / "out" / "plots" / "widths.png"))[..., :3]
    blue = (img[..., 2] > 0.55) & (img[..., 0] < 0.3)                     # heads bars (#2b6cb0)
    orange = (img[..., 0] > 0.8) & (img[..., 1] > 0.35) & (img[..., 1] < 0.5) & (img[..., 2] < 0.2)  # FFN
    # both kinds are visible bars, and the half-kept heads bar is shorter than the 3/4-kept FFN bar
    assert blue.sum() > 500 and orange.sum() > 500
    assert np.nonzero(blue.any(1))[0].size < np.nonzero(orange.any(1))[0].size


def test_extra_comparisons_and_notes_are_rendered_and_rerenderable(tmp_path):
    rec = _record(tmp_path / "run", finish=False)
    rec.add_comparison("by_length", _comparison(), title="Accuracy by input length")
    rec.add_note("Latency: batch 1, 1 thread, <median> of 15 reps.")
    rec.finish()
    paths = write_report(str(tmp_path / "run"), str(tmp_path / "out"))
    page, md = open(paths["html"]).read(), open(paths["md"]).read()
    assert page.count("data:image/png;base64,") == 4                      # + the extra comparison's drop plot
    assert "<h3>Accuracy by input length</h3>" in page and page.count("Flagged: c3") == 2
    assert "<li>Latency: batch 1, 1 thread, &lt;median&gt; of 15 reps.</li>" in page
    assert "### Accuracy by input length" in md and "- Latency: batch 1" in md
    assert "![per-slice drops](plots/slices_by_length.png)" in md
    assert (tmp_path / "out" / "plots" / "slices_by_length.png").is_file()
    # the report's own metrics.json (normalized) renders to the same page
    again = open(write_report(json.load(open(paths["json"])), str(tmp_path / "out2"))["html"]).read()
    part = lambda p: p[p.index("<h2>Summary"):p.index("<h2>Environment")]   # noqa: E731
    assert part(again) == part(page)
    with pytest.raises(ReportError, match="unknown run section 'extras'"):
        rec.set("extras", {})

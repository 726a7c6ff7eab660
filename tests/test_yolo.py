"""Ultralytics YOLOv8n / YOLO11n built from their yaml (random init, no download): structured pruning keeps the
Detect head's outputs and is verified exact, Wanda calibrates (whole-model: the head's per-level ModuleLists
are not a chain) and the pruned model exports to ONNX. ultralytics (AGPL) is a test/benchmark-only dependency; prunekit never imports it."""
import pytest
import torch

import prunekit as pk

ultralytics = pytest.importorskip("ultralytics", reason="ultralytics not installed (pip install ultralytics)")

pytestmark = pytest.mark.slow


def _yolo(cfg):
    torch.manual_seed(0)
    return ultralytics.YOLO(cfg).model.eval()


def _raw(out):
    """The Detect head's raw outputs: eval mode returns (decoded, raw dict), train mode the raw dict."""
    raw = out[1] if isinstance(out, (tuple, list)) else out
    return raw["boxes"], raw["scores"]


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_structured_keeps_detect_outputs(cfg, ratio):
    m, x = _yolo(cfg), torch.randn(1, 3, 96, 96)
    r = pk.prune(m, pk.Structured(ratio=ratio), example_inputs=x)
    assert r.stats["verification"]["mode"] == "exact"
    assert pk.count_params(r.model) < 0.9 * pk.count_params(m)
    with torch.no_grad():
        dense, pruned = m(x), r.model(x)
    assert dense[0].shape == pruned[0].shape
    for a, b in zip(_raw(dense), _raw(pruned)):
        assert a.shape == b.shape and torch.isfinite(b).all()


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_wanda_calibrates_whole_model(cfg):
    m = _yolo(cfg)
    r = pk.prune(m, pk.Sparse(method="wanda", sparsity=0.5), data=[torch.randn(2, 3, 64, 64)])
    assert r.stats["pipeline"] == "whole" and "not a chain" in r.summary()
    assert r.stats["sparsity_total"] == pytest.approx(0.5, abs=0.02)


def test_pruned_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install '.[export]')")
    m, x = _yolo("yolov8n.yaml"), torch.randn(1, 3, 64, 64)
    r = pk.prune(m, pk.Structured(ratio=0.4), example_inputs=x)
    info = pk.export_onnx(r.model, x, str(tmp_path / "yolo.onnx"), reps=1)
    assert info["max_abs_diff"] <= 1e-3

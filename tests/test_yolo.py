"""Ultralytics YOLOv8n / YOLO11n built from their yaml (random init, no download): structured pruning keeps the
Detect head's outputs and is verified exact, Wanda calibrates (whole-model: the head's per-level ModuleLists
are not a chain), the pruned model exports to ONNX, and a short recovery with ultralytics' own detection loss
brings that loss down. ultralytics (AGPL) is a test/benchmark-only dependency; prunekit never imports it."""
import math

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


def _shapes(n, g, size=64):
    """A batch of `n` dark images with two bright rectangles each (class = the colour channel), in ultralytics'
    training-batch format (normalized xywh boxes)."""
    imgs = torch.rand(n, 3, size, size, generator=g) * 0.2
    idx, cls, boxes = [], [], []
    for i in range(n):
        for _ in range(2):
            c = int(torch.randint(0, 3, (1,), generator=g))
            w, h = (torch.rand(2, generator=g) * 0.3 + 0.2).tolist()
            cx, cy = (torch.rand(2, generator=g) * (1 - max(w, h)) + max(w, h) / 2).tolist()
            x0, y0, x1, y1 = (int(v * size) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
            imgs[i, c, y0:y1, x0:x1] = 1.0
            idx.append(i), cls.append(c), boxes.append([cx, cy, w, h])
    return imgs, {"batch_idx": torch.tensor(idx, dtype=torch.float32),
                  "cls": torch.tensor(cls, dtype=torch.float32)[:, None], "bboxes": torch.tensor(boxes)}


def _detection_loss(model):
    """ultralytics' own v8 detection loss (box + cls + DFL) per image, as a pk.recover task_loss_fn."""
    import types
    from ultralytics.utils.loss import v8DetectionLoss
    model.args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)          # ultralytics' default gains
    crit = v8DetectionLoss(model)
    return lambda out, target: crit(out, target)[0].sum() / len(target["batch_idx"].unique())


def _held_out_loss(model, batches):
    """Mean detection loss on held-out batches; BatchNorm on batch statistics (a copy, so the model's running
    statistics are untouched: after a few dozen steps they are still far from the data's)."""
    import copy
    m = copy.deepcopy(model).train()
    fn = _detection_loss(m)
    with torch.no_grad():
        return sum(float(fn(m(x), t)) for x, t in batches) / len(batches)


def test_short_recovery_brings_the_detection_loss_down():
    """Train YOLOv8n a little on synthetic boxes, prune 30% (verified exact), then 20 steps of pk.recover with
    ultralytics' own detection loss: the held-out loss of the pruned model goes down."""
    m = _yolo("yolov8n.yaml")
    g = torch.Generator().manual_seed(0)
    train, held = [_shapes(8, g) for _ in range(20)], [_shapes(8, g) for _ in range(3)]
    pk.recover(m, data=train, loss="task", task_loss_fn=_detection_loss(m), epochs=3, lr=2e-3, quiet=True)
    dense = _held_out_loss(m, held)
    r = pk.prune(m.eval(), pk.Structured(ratio=0.3), example_inputs=torch.randn(1, 3, 64, 64))
    assert r.stats["verification"]["mode"] == "exact" and pk.count_params(r.model) < 0.7 * pk.count_params(m)
    before = _held_out_loss(r.model, held)
    pk.recover(r.model, data=train, loss="task", task_loss_fn=_detection_loss(r.model), epochs=1, lr=1e-3, quiet=True)
    after = _held_out_loss(r.model, held)
    print(f"held-out detection loss: dense {dense:.3f}, pruned {before:.3f}, after recovery {after:.3f}")
    assert math.isfinite(dense) and after < before, (dense, before, after)

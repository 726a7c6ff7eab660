"""Compression stack: int8 agreement and size, ONNX export verified by ONNX Runtime, 2:4 sparsity."""
import logging

import pytest
import torch
import torch.nn as nn

from prunekit.errors import ExportError, UnsupportedHardwareError
from prunekit.export.onnx import export_onnx, failing_op
from prunekit.export.quantize import mask_2to4, quantize_int8, semi_structured_2to4
from prunekit.measure.size import size_on_disk


class Block(nn.Module):
    """A small transformer-ish MLP block: LayerNorm + GELU MLP + residual."""

    def __init__(self, d=64):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(64, 10)).eval()


def test_quantize_int8_replaces_linears_keeps_outputs_close_and_shrinks():
    m = _model()
    q = quantize_int8(m)
    assert all(not isinstance(x, nn.Linear) or "Quantized" in type(x).__name__ for x in q.modules())
    assert isinstance(m[2], nn.Linear)  # original untouched
    x = torch.randn(8, 64)
    ref, got = m(x), q(x)
    rel = (ref - got).norm() / ref.norm()
    assert rel < 0.05
    assert size_on_disk(q) < 0.35 * size_on_disk(m)


def test_quantize_int8_rejects_models_without_linear():
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_int8(nn.Sequential(nn.Conv2d(1, 1, 3)))


def test_export_onnx_verifies_and_times(tmp_path):
    m = _model()
    x = torch.randn(2, 64)
    r = export_onnx(m, x, str(tmp_path / "m.onnx"), reps=5)
    assert (tmp_path / "m.onnx").stat().st_size > 64 * 256 * 4
    assert r["max_abs_diff"] <= 1e-4
    with torch.no_grad():                  # the tolerance scales with the outputs: atol + rtol * max |output|
        assert r["tolerance"] == pytest.approx(1e-4 + 1e-5 * float(m.eval()(x).abs().max()))
    assert r["torch_ms"] > 0 and r["onnxruntime_ms"] > 0


class Eig(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x).real


def test_export_onnx_failure_names_the_op(tmp_path):
    with pytest.raises(ExportError, match="linalg_eig") as ei:
        export_onnx(Eig(), torch.randn(3, 3), str(tmp_path / "e.onnx"))
    assert "linalg_eig" in ei.value.op


def test_failing_op_parses_both_exporters_messages():
    assert failing_op(RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 20 is not "
                                   "supported")) == "aten::foo"
    inner = RuntimeError("No ONNX function found for <OpOverload(op='aten.bar', overload='default')>")
    outer = RuntimeError("Failed to convert")
    outer.__cause__ = inner
    assert failing_op(outer) == "aten.bar"


def test_mask_2to4_keeps_two_largest_of_every_four():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.0, 0.1, -0.2, 9.0]])
    assert mask_2to4(w).tolist() == [[False, True, True, False, False, False, True, True]]
    big = torch.randn(32, 64)
    assert (mask_2to4(big).view(32, -1, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        mask_2to4(torch.randn(4, 6))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_2to4_without_gpu_says_why():
    with pytest.raises(UnsupportedHardwareError, match="compute capability >= 8.0"):
        semi_structured_2to4(_model())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU with compute capability >= 8.0")
def test_2to4_on_gpu_matches_masked_dense():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.Linear(128, 10)).eval()
    res = semi_structured_2to4(m)
    assert res["converted"] == ["0", "2"] and "3" in res["skipped"]
    dense = m.to("cuda", torch.float16)
    with torch.no_grad():
        for i in (0, 2):
            dense[i].weight.mul_(mask_2to4(dense[i].weight))
        x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
        assert torch.allclose(res["model"](x), dense(x), atol=1e-2, rtol=1e-2)


class TokenTypeEmbedding(nn.Module):
    """BERT's embedding when no token_type_ids are passed: gather a zero buffer of max_positions (>= 64) at the
    position ids. onnxscript's constant folding tries this node with ONNX's reference evaluator, which fails for
    gathers over 64+ elements and used to print "Evaluation failed: cannot reshape array ..." during `make demo`."""

    def __init__(self, max_positions=128, d=16):
        super().__init__()
        self.register_buffer("token_type_ids", torch.zeros(1, max_positions, dtype=torch.long), persistent=False)
        self.register_buffer("position_ids", torch.arange(max_positions)[None], persistent=False)
        self.emb, self.types = nn.Embedding(100, d), nn.Embedding(2, d)

    def forward(self, input_ids):
        pos = self.position_ids[:, :input_ids.shape[1]]
        tt = torch.gather(self.token_type_ids.expand(pos.shape[0], -1), 1, pos).expand(input_ids.shape[0], -1)
        return self.emb(input_ids) + self.types(tt)


def test_export_onnx_collects_exporter_log_warnings_instead_of_printing(tmp_path, caplog, capfd):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        r = export_onnx(TokenTypeEmbedding().eval(), torch.randint(0, 100, (2, 32)), str(tmp_path / "t.onnx"), reps=2)
    assert r["max_abs_diff"] <= 1e-4                      # the unfolded node runs fine in ONNX Runtime
    leaked = [rec.getMessage() for rec in caplog.records if rec.name.startswith(("onnxscript", "onnx_ir"))]
    assert leaked == [] and "Evaluation failed" not in capfd.readouterr().err
    msgs = r["exporter_messages"]
    failed = [m for m in msgs if m["message"].startswith("Evaluation failed")]
    assert failed and all(m["note"] and "constant folding" in m["note"] and m["count"] >= 1 for m in failed)
    assert all(m["level"] in ("WARNING", "ERROR", "CRITICAL") for m in msgs)
    # the loggers are restored afterwards
    assert logging.getLogger("onnxscript").propagate and not logging.getLogger("onnxscript").handlers

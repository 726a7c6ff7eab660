"""ONNX export with an ONNX Runtime check: export, run both, compare outputs, time both (`export_onnx`).

The exporter's own chatter (progress lines on stdout, Python warnings, and log records of onnxscript's graph
optimizer) is kept off the terminal and returned in the result's "exporter_messages", each with a note on
what it means, so a caller can show it or not; failures that matter raise ExportError.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import warnings
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from prunekit.errors import ExportError

# ----------------------------------------------------------------------------------------------- ONNX
_OP_PATTERNS = [
    r"OpOverload\(op='([\w.]+)'",                      # dynamo exporter: No ONNX function found for ...
    r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]",  # dynamo exporter: Error when translating node ...
    r"operator '([\w:.]+)'",                            # TorchScript exporter: Exporting the operator 'aten::x'
    r"implementation for (\w+\(\d+\))",                 # ONNX Runtime: Could not find an implementation for Op(v)
    r"\[ONNXRuntimeError\].*?node[: ]+\S*?\(?(\w+)\)?",  # ONNX Runtime: failing node
    r"(aten[:.]{1,2}\w+)",
]


# Loggers the dynamo exporter's pipeline writes to while exporting and optimizing the graph.
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
# (message pattern, what it means) for exporter log records seen in practice.
_KNOWN_MESSAGES = [
    (re.compile(r"^Evaluation failed: "),
     "onnxscript's constant folding could not precompute one node with ONNX's reference evaluator and left it in "
     "the graph, where ONNX Runtime computes it (the output check covers it). Seen with BERT's token_type_ids "
     "buffer: onnx<=1.23's reference GatherElements fails when gathering over 64 or more elements (onnx/onnx#8444)."),
]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[Dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        for m in self.messages:
            if m["logger"] == record.name and m["message"] == msg:
                m["count"] += 1
                return
        note = next((n for pat, n in _KNOWN_MESSAGES if pat.search(msg)), None)
        self.messages.append({"logger": record.name, "level": record.levelname, "message": msg, "count": 1,
                              "note": note})


@contextlib.contextmanager
def _exporter_log():
    """Collect (not print) WARNING+ records of the exporter's loggers for the block; yields the collector.

    Without this, onnxscript's optimizer warnings reach stderr through logging's last-resort handler and read
    like failures of a run whose export in fact succeeded and was verified."""
    handler = _Collect()
    saved = []
    for name in _EXPORTER_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate))
        lg.addHandler(handler)
        lg.propagate = False
    try:
        yield handler
    finally:
        for lg, propagate in saved:
            lg.removeHandler(handler)
            lg.propagate = propagate


def failing_op(exc: BaseException) -> Optional[str]:
    """Best guess at the operator an export/runtime error is about, searching the whole exception chain."""
    texts, e, seen = [], exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(texts)
    for pat in _OP_PATTERNS:
        mt = re.search(pat, text)
        if mt:
            return mt.group(1)
    return None


def _flat_tensors(out) -> List[torch.Tensor]:
    """Model outputs flattened in the order the ONNX exporter lays them out."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def _as_args(example_inputs):
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), None
    return tuple(example_inputs), None


def _interleaved_median_ms(fns, reps: int, warmup: int = 3) -> List[float]:
    """Median ms of each callable, timed alternately (a, b, a, b, ...) so load changes hit both alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    return [float(np.median(t) * 1e3) for t in ts]


def export_onnx(model: nn.Module, example_inputs, path: str, *, atol: float = 1e-4, rtol: float = 1e-5,
                opset: Optional[int] = None, dynamo: bool = True, reps: int = 20, threads: int = 1,
                dynamic_batch: bool = False) -> Dict[str, Any]:
    """Export `model` to ONNX at `path`, then verify and time it with ONNX Runtime (CPU).

    example_inputs: a tensor, a tuple of tensors (positional) or a dict (keyword arguments).
    Returns {"path", "max_abs_diff", "tolerance", "torch_ms", "onnxruntime_ms", "speedup", "opset", "exporter", "threads",
    "exporter_messages"}; exporter_messages lists the exporter's log warnings ({"logger", "level", "message",
    "count", "note"}), which are collected instead of printed.
    Raises ExportError naming the failing op when export, loading or running fails, and when any output
    differs from PyTorch by more than atol + rtol * max |PyTorch output| (float32 kernels differ by a few ulps of
    the output's scale between runtimes and CPUs: 1.2e-4 on MiniLM logits seen on an AVX-512 machine).
    """
    import onnxruntime as ort

    model = model.eval()
    args, kwargs = _as_args(example_inputs)
    with torch.inference_mode():
        ref = _flat_tensors(model(*args, **(kwargs or {})))
    export_kw = {"opset_version": opset, "dynamo": dynamo}
    if dynamic_batch and dynamo:
        export_kw["dynamic_shapes"] = _batch_dynamic_shapes(args, kwargs)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _exporter_log() as log:
            warnings.simplefilter("ignore")                                   # exporter progress chatter
            torch.onnx.export(model, args, path, kwargs=kwargs, external_data=False, verbose=False, **export_kw)
    except Exception as e:  # the exporter raises many types; all are reported the same way
        op = failing_op(e)
        raise ExportError(f"ONNX export of {type(model).__name__} failed"
                          + (f" at operator '{op}'" if op else "") + f": {type(e).__name__}: {_first_line(e)}. "
                          f"Try dynamo={not dynamo} (the other exporter), a newer opset, or replace that op in the "
                          f"model.", op) from e
    feeds = _feeds(args, kwargs)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    try:
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        if len(names) != len(feeds):
            raise ExportError(f"ONNX model at {path} takes {len(names)} inputs {names} but {len(feeds)} example "
                              f"inputs were given (inputs unused by the graph are dropped at export)")
        feed = dict(zip(names, feeds))
        got = sess.run(None, feed)
    except ExportError:
        raise
    except Exception as e:
        op = failing_op(e)
        raise ExportError(f"ONNX Runtime could not run the exported {type(model).__name__} ({path})"
                          + (f"; failing operator '{op}'" if op else "") + f": {_first_line(e)}. Try another "
                          f"opset (opset=...) or the other exporter (dynamo={not dynamo}).", op) from e
    diff = _max_abs_diff(ref, got, path)
    scale = max((float(t.detach().abs().max()) for t in ref if t.is_floating_point() and t.numel()), default=0.0)
    tol = atol + rtol * scale
    if diff > tol:
        raise ExportError(f"ONNX Runtime output of {path} differs from PyTorch by {diff:.3g} (> atol {atol:g} + "
                          f"rtol {rtol:g} x max|output| {scale:.3g}). "
                          f"Check ops with changed numerics (e.g. LayerNorm/GELU approximations, int8 layers) or "
                          f"raise atol if the difference is expected.")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            t_ms, o_ms = _interleaved_median_ms([lambda: model(*args, **(kwargs or {})),
                                                 lambda: sess.run(None, feed)], reps)
    finally:
        torch.set_num_threads(old)
    return {"path": str(path), "max_abs_diff": diff, "tolerance": tol, "torch_ms": t_ms, "onnxruntime_ms": o_ms,
            "speedup": t_ms / o_ms, "opset": opset, "exporter": "dynamo" if dynamo else "torchscript",
            "threads": threads, "exporter_messages": log.messages}


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _batch_dynamic_shapes(args, kwargs):
    dim = torch.export.Dim("batch")
    if kwargs:
        return {k: {0: dim} if isinstance(v, torch.Tensor) else None for k, v in kwargs.items()}
    return tuple({0: dim} if isinstance(a, torch.Tensor) else None for a in args)


def _feeds(args, kwargs) -> List[np.ndarray]:
    vals = list(kwargs.values()) if kwargs else list(args)
    return [v.detach().cpu().numpy() for v in vals if isinstance(v, torch.Tensor)]


def _max_abs_diff(ref: Sequence[torch.Tensor], got: Sequence[np.ndarray], path: str) -> float:
    if len(got) < len(ref):
        raise ExportError(f"ONNX model at {path} returns {len(got)} outputs, PyTorch returned {len(ref)}")
    diffs = []
    for i, (r, g) in enumerate(zip(ref, got)):
        r = r.detach().float().cpu().numpy()
        if r.shape != np.shape(g):
            raise ExportError(f"output {i} of {path} has shape {np.shape(g)}, PyTorch gives {r.shape}")
        diffs.append(float(np.max(np.abs(r - g))) if r.size else 0.0)
    return max(diffs) if diffs else 0.0

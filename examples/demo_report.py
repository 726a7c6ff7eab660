"""The demo's measurements and report content: summary rows, ONNX export check, notes, what goes into the run.

The report itself is prunekit's (`pk.write_report`); the demo records what it shows through `pk.RunRecorder`:
summary rows, the Lee slice comparison, the two polarity comparisons (`add_comparison`) and how everything
was measured (`add_note`)."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn as nn

import prunekit as pk
from demo_eval import PROBE_FOLDS
from demo_prune import LATENCY_BATCH, LATENCY_THREADS, LATENCY_TOKENS
from demo_settings import Settings
from demo_text import LEE_MAX_TOKENS

EXTRA_TITLES = {"polarity_label": "Polarity probe accuracy by label",
                "polarity_length": "Polarity probe accuracy by sentence length"}


@contextlib.contextmanager
def native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for the block.

    pk.peak_memory runs the torch profiler, whose C++ side prints "USDT: profiler_start" and, on machines
    without a GPU, "ERROR: gpuGetDeviceCount failed" lines straight to fd 2; they are harmless but read like
    failures in the demo's output. Python exceptions are unaffected."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def summary_row(variant: str, model: nn.Module, evals: Dict[str, pk.EvalResult], latency_ms: float,
                inputs) -> Dict[str, Any]:
    with native_stderr_silenced():
        mem = pk.peak_memory(lambda: _forward_no_grad(model, inputs))
    return {"variant": variant, "quality": evals["lee"].value,
            "probe_accuracy": evals["polarity_label"].value, "latency_ms": latency_ms,
            "memory_bytes": mem["torch_peak_bytes"], "size_bytes": pk.size_on_disk(model),
            "params": pk.count_params(model)}


def _forward_no_grad(model, inputs):
    with torch.inference_mode():
        model(**inputs)


def export_checked(model: nn.Module, inputs, path: Path) -> Dict[str, Any]:
    """Export to ONNX and verify with ONNX Runtime; a failure is reported, never fatal to the demo."""
    try:
        r = pk.export_onnx(model, dict(inputs), str(path), reps=5)
        return {"ok": True, "status": f"exported to {path} and verified with ONNX Runtime", **r}
    except pk.ExportError as e:
        return {"ok": False, "status": f"not exported: {e}"}


def summary_table(rows: List[Dict[str, Any]]) -> str:
    """The terminal summary: one Markdown row per variant."""
    base = rows[0]
    lines = ["| variant | Lee Pearson | polarity probe acc | latency ms (32x32, 1 thr) | speedup | size MB | params |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['quality']:.4f} | {r['probe_accuracy']:.3f} | {r['latency_ms']:.1f} | "
                     f"{base['latency_ms'] / r['latency_ms']:.2f}x | {r['size_bytes'] / 1e6:.1f} | {r['params']:,} |")
    return "\n".join(lines)



def method_notes(s: Settings, chosen: Dict[str, Any], n_candidates: int, distillation, n_sents: int,
                 onnx: Dict[str, Any]) -> List[str]:
    """One line per measurement: how it was made (the report's "Notes" section)."""
    notes = [f"Latency: pk.measure_latency, batch {LATENCY_BATCH} x {LATENCY_TOKENS} tokens, {LATENCY_THREADS} "
             f"thread, {s.latency_reps} interleaved reps after {s.latency_warmup} warm-up, median; the "
             "'before distillation' row has the pruned model's architecture and so its latency.",
             f"Pruning: {n_candidates} pk.MACs targets timed against dense; chose the least-pruned one reaching "
             f"{s.speedup_goal}x: {chosen['name']}.",
             f"Distillation: pk.recover, 1 - cosine to the dense model's sentence embeddings, {distillation.steps} "
             f"steps on {n_sents} lee_background sentences, lr {s.distill_lr}.",
             "Lee: Pearson r of embedding cosine vs human similarity, 1225 pairs of the 50 lee.cor documents "
             f"(<= {LEE_MAX_TOKENS} tokens). Polarity: logistic-regression probe, out-of-fold accuracy, fixed "
             f"stratified {PROBE_FOLDS}-fold split of the 200 sentences.",
             f"Per-slice: pk.compare_slices, paired stratified bootstrap ({s.n_boot} replicates), a slice is flagged "
             "when its drop exceeds 2x the overall drop and the Bonferroni-corrected CI of the excess excludes 0."]
    notes.append(f"ONNX: {onnx['status']}" + (f" (max |ONNX Runtime - PyTorch| = {onnx['max_abs_diff']:.2e}, "
                                                f"ORT {onnx['onnxruntime_ms']:.1f} ms vs torch {onnx['torch_ms']:.1f} ms "
                                                f"at batch {LATENCY_BATCH})" if onnx.get("ok") else ""))
    for m in onnx.get("exporter_messages", []):
        notes.append(f"ONNX exporter log ({m['logger']}, {m['level']}, {m['count']}x): \"{m['message']}\""
                     + (f" - {m['note']}" if m.get("note") else ""))
    return notes


def record_results(rec, s: Settings, rows, evals: Dict[str, Dict[str, pk.EvalResult]], chosen, lat, distillation,
                   n_sents: int, onnx: Dict[str, Any], model_dir: Path, notes: List[str]) -> None:
    """Everything the report shows, through the recorder: summary, the Lee slices, the polarity comparisons
    (`add_comparison`, rendered like the main slice section) and the notes (`add_note`)."""
    pruned = evals["pruned"]
    rec.set("summary", {"metric": "Lee similarity (Pearson r)", "higher_is_better": True, "onnx": onnx,
                        "batch_size": LATENCY_BATCH, "rows": rows, "chosen": chosen["name"],
                        "macs_ratio": chosen["macs_ratio"], "model_dir": str(model_dir),
                        "latency": lat, "distillation": {"sentences": n_sents, "steps": distillation.steps,
                                                         "status": distillation.status,
                                                         "history": distillation.history,
                                                         "lr": s.distill_lr, "batch": s.distill_batch},
                        "evaluations": {name: {"dense": evals["dense"][name].value, "pruned": ev.value,
                                               "pruned_before_distillation": evals["before"][name].value,
                                               "pruned+int8": evals["int8"][name].value,
                                               "comparison": ev.comparison.to_dict()}
                                        for name, ev in pruned.items()}})
    rec.set("slices", pruned["lee"].comparison)
    for name, ev in pruned.items():
        if name != "lee":
            rec.add_comparison(name, ev.comparison, title=EXTRA_TITLES.get(name, name))
    for n in notes:
        rec.add_note(n)

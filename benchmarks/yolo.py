"""Measured CPU speedup of a structurally pruned Ultralytics YOLOv8n vs the dense model at 640x640.

    python benchmarks/yolo.py --out benchmarks/results/yolo.json [--ratios 0.3 0.5] [--reps 10] [--threads 1]

YOLOv8n is built from its yaml with random weights (no download; ultralytics is a benchmark/test-only
dependency, AGPL, never imported by prunekit). Each ratio prunes the dense model with `pk.Structured` (the Detect
head's outputs keep their shape; prunekit verifies the cut against the dense model with the removed channels
zeroed), then `pk.measure_latency` times dense and pruned models interleaved in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import prunekit as pk
from prunekit.io.atomic import atomic_write_json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/yolo.json")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=640)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from ultralytics import YOLO

    dense = YOLO("yolov8n.yaml").model.eval()
    x = torch.randn(1, 3, args.size, args.size)
    models, rows = {"dense": dense}, []
    for r in args.ratios:
        t0 = time.perf_counter()
        res = pk.prune(dense, pk.Structured(ratio=r), example_inputs=torch.randn(1, 3, 256, 256))
        name = f"pruned {r:.0%}"
        models[name] = res.model
        rows.append({"model": name, "ratio": r, "prune_s": round(time.perf_counter() - t0, 1),
                     "params": pk.count_params(res.model), "macs": pk.count_macs(res.model, x),
                     "verification": res.stats["verification"]})
    lat = pk.measure_latency(models, x, batch_sizes=(1,), threads=args.threads, warmup=2, reps=args.reps)
    base = {"model": "dense", "params": pk.count_params(dense), "macs": pk.count_macs(dense, x)}
    for row in rows:
        row["speedup"] = round(lat.speedup("dense", row["model"], 1), 3)
        row["median_ms"] = lat.get_row(row["model"], 1)["median_ms"]
    base["median_ms"] = lat.get_row("dense", 1)["median_ms"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write_json(args.out, {"size": args.size, "threads": args.threads, "dense": base, "pruned": rows,
                          "latency": dict(lat), "markdown": lat.to_markdown()})
    print(lat.to_markdown())


if __name__ == "__main__":
    main()

"""Pipeline benchmark: the Fashion-MNIST CNN pruned to 2x and 3x *measured* CPU speedup.

For each requested speedup:
  * prunekit: Structured(target=Latency(speedup)) -> accuracy without recovery, + fine-tuning (task loss),
    + distillation (KD from the dense model), + distillation with labels (loss="mixed": 0.5 KD + 0.5 task),
    all with the same training budget (steps, lr, data);
    requested vs achieved speedup of the latency target (re-measured here, interleaved with the dense model).
  * Torch-Pruning 1.6 (MagnitudePruner + MagnitudeImportance(p=2)) at the smallest uniform ratio whose
    measured speedup reaches prunekit's re-measured one (bisection; `--tp-match macs` instead matches MACs),
    then the same fine-tuning budgets; its measured speedup too.

    .venv/bin/python benchmarks/pipeline.py --out benchmarks/results/pipeline.json   # ~20 min on 2 idle cores

Defaults: every fine-tuning run is 1400 AdamW steps of batch 128 (3 epochs of the 60k training images),
accuracy on the full 10k test set.

Prints a Markdown table and writes JSON. Timing: 1 thread, batch 16, min of interleaved repetitions.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch

import prunekit as pk
from prunekit.structured.latency import Latency
from prunekit.zoo import accuracy


def measured_speedup(dense, pruned, x, reps=60):
    res = pk.measure_latency({"dense": dense, "pruned": pruned}, x, batch_sizes=(16,), threads=1, reps=reps)
    row = {r["model"]: r for r in res["rows"]}
    return {"min": row["dense"]["min_ms"] / row["pruned"]["min_ms"],
            "median": row["dense"]["median_ms"] / row["pruned"]["median_ms"]}


def train(model, dense, data, loss, steps, lr):
    cfg = pk.Recover(epochs=max(1, -(-steps // len(data))), max_steps=steps, lr=lr, loss=loss, warmup=0.05,
                     weight_decay=5e-4, temperature=4.0)
    return pk.recover(model, teacher=dense if loss in ("kd", "mixed") else None, data=data, config=cfg, quiet=True)


def tp_magnitude(dense, x, ratio):
    """Torch-Pruning's MagnitudePruner (L2) at one uniform ratio, the classifier kept; returns (model, MACs)."""
    import torch_pruning as tp
    m = copy.deepcopy(dense)
    tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                              ignored_layers=[m.fc]).step()
    return m, tp.utils.count_ops_and_params(m, x)[0]


def tp_bisect(dense, x, enough, steps):
    """Smallest uniform Torch-Pruning ratio (bisection over [0, 0.95]) whose model satisfies
    `enough(model, macs)`; returns (model, ratio, macs), the 0.95 model if no ratio tried was enough."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        m, macs = tp_magnitude(dense, x, mid)
        if enough(m, macs):
            hi, best = mid, (m, mid, macs)
        else:
            lo = mid
    if best is None:
        m, macs = tp_magnitude(dense, x, hi)
        best = (m, hi, macs)
    return best


def tp_prune_for_speed(dense, x, speed_goal, steps=10):
    """Torch-Pruning at the smallest uniform ratio whose measured speedup reaches `speed_goal` (each candidate
    timed against the dense model like prunekit's result): both tools compared at the same measured speed,
    which is what the latency target promises."""
    return tp_bisect(dense, x, lambda m, _macs: measured_speedup(dense, m, x)["min"] >= speed_goal, steps)


def tp_prune(dense, x, macs_goal):
    """Torch-Pruning at the smallest uniform ratio whose MACs are at most `macs_goal`."""
    return tp_bisect(dense, x, lambda _m, macs: macs <= macs_goal, 14)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/pipeline_bench.json")
    ap.add_argument("--speedups", default="2,3")
    ap.add_argument("--train-limit", type=int, default=0, help="training images used (0: all 60k)")
    ap.add_argument("--steps", type=int, default=1400, help="optimizer steps of every fine-tuning run")
    ap.add_argument("--batch-size", type=int, default=128, help="training batch size")
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-limit", type=int, default=10000)
    ap.add_argument("--allocation", default="uniform", choices=["uniform", "cost"])
    ap.add_argument("--tp-match", default="speed", choices=["speed", "macs"],
                    help="pick Torch-Pruning's ratio by the same measured speedup (default) or at most our MACs")
    ap.add_argument("--importance", default="taylor", help="'taylor' (8 training batches) or a name like 'l2'")
    a = ap.parse_args()
    torch.set_num_threads(a.train_threads)          # training; every timing pins 1 thread itself
    warnings.filterwarnings("ignore")
    t_start = time.time()
    dense = pk.fashion_mnist_cnn().eval()
    train_data = pk.data.load("fashion-mnist", "train", batch_size=a.batch_size, limit=a.train_limit or None)
    val = pk.data.load("fashion-mnist", "test", batch_size=500, limit=a.val_limit)
    x = val[0][0][:1]
    acc_dense = accuracy(dense, val)
    rows = []
    for sp in [float(s) for s in a.speedups.split(",")]:
        torch.manual_seed(0)
        t0 = time.time()
        imp = a.importance
        if imp == "taylor":          # first-order Taylor from 8 training batches (TP's recipe uses magnitude)
            from prunekit.structured.importance import Taylor
            imp = Taylor(data=[train_data[i] for i in range(8)], batches=8)
        res = pk.prune(dense, pk.Structured(importance=imp, target=Latency(speedup=sp, allocation=a.allocation)),
                       example_inputs=x)
        t_prune = time.time() - t0
        pruned = res.model
        check = measured_speedup(dense, pruned, x)
        acc0 = accuracy(pruned, val)
        ft = train(copy.deepcopy(pruned), dense, train_data, "task", a.steps, a.lr)
        kd = train(copy.deepcopy(pruned), dense, train_data, "kd", a.steps, a.lr)
        mixed = train(copy.deepcopy(pruned), dense, train_data, "mixed", a.steps, a.lr)
        if a.tp_match == "speed":
            tp_model, tp_ratio, tp_macs = tp_prune_for_speed(dense, x, check["min"])
        else:
            tp_model, tp_ratio, tp_macs = tp_prune(dense, x, res.stats["macs_after"])
        tp_speed = measured_speedup(dense, tp_model, x)
        tp_acc0 = accuracy(tp_model, val)
        tp_ft = train(copy.deepcopy(tp_model), dense, train_data, "task", a.steps, a.lr)
        tp_kd = train(copy.deepcopy(tp_model), dense, train_data, "kd", a.steps, a.lr)
        tp_mixed = train(copy.deepcopy(tp_model), dense, train_data, "mixed", a.steps, a.lr)
        row = {"requested": sp, "achieved_search": res.stats["latency_achieved"], "achieved_recheck_min": check["min"],
               "achieved_recheck_median": check["median"], "reached": res.stats["latency_reached"],
               "prune_seconds": t_prune, "macs_after": res.stats["macs_after"], "macs_before": res.stats["macs_before"],
               "params_after": res.stats["params_after"],
               "acc_dense": acc_dense, "acc_pruned": acc0, "acc_finetune": accuracy(ft, val), "acc_distill": accuracy(kd, val),
               "acc_distill_labels": accuracy(mixed, val),
               "tp_ratio": tp_ratio, "tp_macs": tp_macs, "tp_speedup_min": tp_speed["min"],
               "tp_acc_pruned": tp_acc0, "tp_acc_finetune": accuracy(tp_ft, val), "tp_acc_distill": accuracy(tp_kd, val),
               "tp_acc_distill_labels": accuracy(tp_mixed, val),
               "kept_per_group": [g["kept"] for g in res.plan.groups]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"rows": rows, "settings": vars(a), "env": pk.environment_info(), "seconds": time.time() - t_start}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(markdown(rows, a))


def markdown(rows, a):
    pct = lambda v: f"{100 * v:.2f}"
    lines = [f"Fashion-MNIST CNN, {a.val_limit} test images; fine-tuning = {a.steps} AdamW steps of batch {a.batch_size}, "
             f"lr {a.lr}, on {a.train_limit or 60000} train images (same for every row); speedup = dense/pruned latency, "
             f"batch 16, 1 thread, min of 60 interleaved reps.", "",
             "| requested | achieved (search / recheck) | MACs | method | no recovery | + fine-tune | + distill | + distill & labels |",
             "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['requested']:.1f}x | {r['achieved_search']:.2f}x / {r['achieved_recheck_min']:.2f}x | "
                     f"{r['macs_before'] / r['macs_after']:.2f}x fewer | prunekit Latency target ({a.importance}) | {pct(r['acc_pruned'])} | "
                     f"{pct(r['acc_finetune'])} | {pct(r['acc_distill'])} | {pct(r['acc_distill_labels'])} |")
        lines.append(f"| {r['requested']:.1f}x | - / {r['tp_speedup_min']:.2f}x | {r['macs_before'] / r['tp_macs']:.2f}x fewer | "
                     f"Torch-Pruning magnitude, ratio {r['tp_ratio']:.3f} | {pct(r['tp_acc_pruned'])} | "
                     f"{pct(r['tp_acc_finetune'])} | {pct(r['tp_acc_distill'])} | {pct(r['tp_acc_distill_labels'])} |")
    lines.append(f"\nDense accuracy: {pct(rows[0]['acc_dense'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Structural pruning benchmark: prunekit vs Torch-Pruning at ~2x MAC reduction on torchvision models.

For each model: params, MACs, prune time, and CPU latency (batch 1 and 16, threads pinned, warm-up, median of
interleaved runs in one process) of dense vs prunekit vs Torch-Pruning, pruned to about half the MACs.
Torch-Pruning (PyPI `torch-pruning`, benchmark-only dependency) gets the channel ratio that reaches the same
MAC reduction (found by bisection on its own MAC counter) with L2 magnitude importance, like prunekit.

    python benchmarks/structural.py --out benchmarks/results/structural.json
    python benchmarks/structural.py --models resnet50 --reps 10       # one model, quicker
    python benchmarks/structural.py --first-call --out benchmarks/results/first_call.json

--first-call measures what a user waits for the first time: in a fresh Python process (torch, torchvision
and the random-init ResNet-50 already loaded), the library's import plus its first prune of ResNet-50 to
about half the MACs (prunekit: Structured(target=MACs(0.5)); Torch-Pruning: MetaPruner with L2 magnitude at
channel ratio 0.3, which removes about half the MACs). Fresh processes alternate between the tools; medians.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision

import prunekit as pk

MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t"]


def prunekit_prune(model, x, macs_ratio, round_to):
    """Prune twice and time the second call: Torch-Pruning's time below is also a warm call (the last of its
    bisection runs), so both exclude one-off start-up costs (lazy imports, allocator warm-up)."""
    cfg = pk.Structured(target=pk.MACs(ratio=macs_ratio), round_to=round_to)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pk.prune(model, cfg, example_inputs=x)
        t = time.perf_counter()
        r = pk.prune(model, cfg, example_inputs=x)
    return r.model, time.perf_counter() - t


def tp_prune(model, x, macs_ratio):
    """Torch-Pruning 1.6 MetaPruner with L2 magnitude, channel ratio bisected to the same MAC reduction."""
    import torch_pruning as tp
    base_macs, _ = tp.utils.count_ops_and_params(model, x)
    goal = base_macs * (1 - macs_ratio)

    def run(ratio):
        m = copy.deepcopy(model)
        ignored = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod.out_features == 1000]
        kw = {}
        if isinstance(getattr(m, "encoder", None), torch.nn.Module) and hasattr(m, "class_token"):
            kw = {"num_heads": {blk.self_attention: blk.self_attention.num_heads for blk in m.encoder.layers}}
        t = time.perf_counter()
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=ignored, **kw)
        pruner.step()
        dt = time.perf_counter() - t
        macs, _ = tp.utils.count_ops_and_params(m, x)
        return m, macs, dt

    lo, hi = 0.0, 0.9
    best = None
    for _ in range(7):
        mid = (lo + hi) / 2
        m, macs, dt = run(mid)
        if macs > goal:
            lo = mid
        else:
            hi = mid
            best = (m, dt, mid)
    if best is None:
        m, macs, dt = run(hi)
        best = (m, dt, hi)
    return best


def _tp_probe(name, macs_ratio, mem_gb, q):
    """Child process: can Torch-Pruning prune this model within `mem_gb`? (It recurses without bound on some
    architectures, e.g. Swin, and can exhaust the machine's memory; the parent must survive that.)"""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (int(mem_gb * 2 ** 30),) * 2)
    try:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        tp_prune(model, torch.randn(1, 3, 224, 224), macs_ratio)
        q.put("ok")
    except BaseException as e:  # MemoryError, RecursionError, or Torch-Pruning's own errors
        q.put(f"failed: {type(e).__name__}: {str(e)[:120]}")


def tp_feasible(name, macs_ratio, mem_gb=8.0, timeout=900):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_tp_probe, args=(name, macs_ratio, mem_gb, q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        return f"failed: no result within {timeout} s"
    return q.get() if not q.empty() else f"failed: child exited with code {p.exitcode}"


def bench_model(name, args):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    row = {"model": name, "params_dense": pk.count_params(model), "macs_dense": pk.count_macs(model, x)}
    models = {"dense": model}
    pm, t_pk = prunekit_prune(model, x, args.macs_ratio, args.round_to)
    row.update(params_prunekit=pk.count_params(pm), macs_prunekit=pk.count_macs(pm, x), time_prunekit_s=t_pk)
    models["prunekit"] = pm
    status = tp_feasible(name, args.macs_ratio)
    try:
        if status != "ok":
            raise RuntimeError(status)
        tm, t_tp, ratio = tp_prune(model, x, args.macs_ratio)
        tm.eval()
        tm(x)
        row.update(params_tp=pk.count_params(tm), macs_tp=pk.count_macs(tm, x), time_tp_s=t_tp, tp_ratio=ratio,
                   tp_status="ok")
        models["torch-pruning"] = tm
    except Exception as e:  # Torch-Pruning fails on some architectures: record it, keep going
        row.update(tp_status=f"failed: {type(e).__name__}: {str(e)[:120]}")
        if args.verbose:
            traceback.print_exc()
    lat = pk.measure_latency(models, x, batch_sizes=args.batch_sizes, threads=args.threads, warmup=args.warmup,
                             reps=args.reps)
    for r in lat["rows"]:
        row[f"lat_ms_{r['model']}_b{r['batch_size']}"] = r["median_ms"]
    for bs in args.batch_sizes:
        d = row[f"lat_ms_dense_b{bs}"]
        row[f"speedup_prunekit_b{bs}"] = d / row[f"lat_ms_prunekit_b{bs}"]
        if f"lat_ms_torch-pruning_b{bs}" in row:
            row[f"speedup_tp_b{bs}"] = d / row[f"lat_ms_torch-pruning_b{bs}"]
    row["env"] = lat["env"]
    return row


FIRST_CALL = {
    "prunekit": """
import prunekit as pk
cfg = pk.Structured(target=pk.MACs(ratio=0.5), round_to=8)
pk.prune(model, cfg, example_inputs=x)
""",
    "torch-pruning": """
import torch_pruning as tp
ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.3,
                     ignored_layers=ignored).step()
""",
}
FIRST_CALL_SETUP = """
import json, sys, time, warnings
import torch, torchvision
warnings.simplefilter("ignore")
torch.set_num_threads({threads})
torch.manual_seed(0)
model = torchvision.models.resnet50(weights=None).eval()
x = torch.randn(1, 3, 224, 224)
t0 = time.perf_counter()
{code}
t1 = time.perf_counter()
heavy = sorted(m for m in ("transformers", "matplotlib", "onnx") if m in sys.modules)
print(json.dumps({{"seconds": t1 - t0, "heavy_modules": heavy}}))
"""


def first_call(runs: int, threads: int) -> dict:
    """Median over `runs` fresh processes (alternating tools) of import + first ResNet-50 prune, per tool."""
    times = {k: [] for k in FIRST_CALL}
    heavy = {}
    for _ in range(runs):
        for tool, code in FIRST_CALL.items():
            src = FIRST_CALL_SETUP.format(threads=threads, code=code)
            out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            times[tool].append(res["seconds"])
            heavy[tool] = res["heavy_modules"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"runs": runs, "threads": threads, "seconds": times, "median_s": med, "heavy_modules": heavy,
            "ratio_prunekit_over_tp": med["prunekit"] / med["torch-pruning"]}


def markdown(rows, batch_sizes):
    hdr = ["model", "MACs dense (G)", "prunekit MACs x", "TP MACs x", "prune s (pk / TP)"]
    hdr += [f"speedup b{b} (pk / TP)" for b in batch_sizes]
    out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        tpx = f"{r['macs_dense'] / r['macs_tp']:.2f}x" if "macs_tp" in r else "fails (" + r["tp_status"][8:60] + ")"
        cells = [r["model"], f"{r['macs_dense'] / 1e9:.2f}", f"{r['macs_dense'] / r['macs_prunekit']:.2f}x", tpx,
                 f"{r['time_prunekit_s']:.2f} / " + (f"{r['time_tp_s']:.2f}" if "time_tp_s" in r else "-")]
        for b in batch_sizes:
            tp_s = f"{r[f'speedup_tp_b{b}']:.2f}x" if f"speedup_tp_b{b}" in r else "-"
            cells.append(f"{r[f'speedup_prunekit_b{b}']:.2f}x / {tp_s}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--macs-ratio", type=float, default=0.5, help="fraction of MACs to remove (0.5 = 2x fewer)")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/structural.json")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--first-call", action="store_true", help="only the fresh-process first-call timing")
    ap.add_argument("--first-call-runs", type=int, default=5)
    args = ap.parse_args()
    if args.first_call:
        res = first_call(args.first_call_runs, args.threads)
        print(json.dumps(res["median_s"]), f"prunekit / Torch-Pruning = {res['ratio_prunekit_over_tp']:.2f}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "first_call": res}, indent=1))
        print(f"wrote {args.out}")
        return
    rows = []
    for name in args.models:
        print(f"[structural] {name} ...", flush=True)
        rows.append(bench_model(name, args))
        print(markdown(rows[-1:], args.batch_sizes), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)     # keep what is done if a later model fails
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    md = markdown(rows, args.batch_sizes)
    print("\n" + md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "markdown": md}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

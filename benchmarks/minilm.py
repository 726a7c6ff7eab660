"""all-MiniLM-L6-v2 structured pruning before any recovery: prunekit vs Torch-Pruning's BERT recipe.

Variants (all from the same pretrained model, no fine-tuning or distillation afterwards):
  * prunekit heads/FFN 30% and 50%: `pk.Structured(ratio=r)` removes r of each layer's attention heads and FFN
    neurons; the hidden size stays (it is the model's output).
  * Torch-Pruning at ratio 0.3, following its examples/transformers/prune_hf_bert.py recipe: MetaPruner with
    L2 magnitude importance, global pruning, `num_heads` per q/k/v, prune_num_heads=True,
    head_pruning_ratio=0.3, pooler ignored. It also narrows the hidden size (embeddings, every residual).
  * prunekit at matched latency: the `pk.MACs` target whose measured latency is closest to Torch-Pruning's,
    picked from a small grid timed in the same interleaved run, so quality is compared at equal speed.

Quality: Lee document similarity, Pearson r between embedding cosine and human scores over the 1225 pairs of
gensim's lee.cor (mean pooling; the dense model gives 0.656), evaluated with `pk.evaluate` exactly as in
examples/demo_eval.py. Latency: `pk.measure_latency`, batch 32 x 32 tokens, 1 thread, all models interleaved.

    python benchmarks/minilm.py --out bench_minilm.json [--reps 15] [--skip-tp]

Prints a Markdown table and writes JSON (rows + environment) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import prunekit as pk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import demo_eval  # noqa: E402
import demo_prune  # noqa: E402
import demo_text  # noqa: E402

MATCH_GRID = (0.35, 0.4, 0.45, 0.5, 0.55)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def torch_pruning_bert(model, example, ratio: float):
    """Torch-Pruning's HF BERT recipe (examples/transformers/prune_hf_bert.py) on a copy of `model`.

    Returns (pruned model, None) or (None, error text) when Torch-Pruning is missing or fails on this
    transformers version."""
    import copy
    try:
        import torch_pruning as tp
        from transformers.models.bert.modeling_bert import BertSelfAttention
    except ImportError as e:
        return None, f"ImportError: {e}"
    m = copy.deepcopy(model).eval()
    num_heads = {}
    for mod in m.modules():
        if isinstance(mod, BertSelfAttention):
            for lin in (mod.query, mod.key, mod.value):
                num_heads[lin] = mod.num_attention_heads
    try:
        pruner = tp.pruner.MetaPruner(
            m, example, global_pruning=True, importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
            iterative_steps=1, pruning_ratio=ratio, num_heads=num_heads, prune_head_dims=False,
            prune_num_heads=True, head_pruning_ratio=ratio, output_transform=lambda out: out.pooler_output.sum(),
            ignored_layers=[m.pooler])
        for g in pruner.step(interactive=True):
            g.prune()
        for mod in m.modules():
            if isinstance(mod, BertSelfAttention):
                mod.num_attention_heads = pruner.num_heads[mod.query]
                mod.attention_head_size = mod.query.out_features // mod.num_attention_heads
                mod.all_head_size = mod.query.out_features
        with torch.no_grad():
            m(**example)
    except Exception as e:  # a third-party tracer on a new transformers version: report, don't crash the benchmark
        return None, f"{type(e).__name__}: {e}"
    return m, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write JSON results here")
    ap.add_argument("--reps", type=int, default=15, help="interleaved latency repetitions")
    ap.add_argument("--tp-ratio", type=float, default=0.3)
    ap.add_argument("--skip-tp", action="store_true", help="prunekit rows only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for pruning and evaluation "
                    "(latency is always timed with 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    dense, tokenizer = demo_text.load_minilm()
    suite = demo_eval.EvalSuite(tokenizer)
    inputs = demo_prune.latency_inputs(tokenizer)
    example = {k: v[:2] for k, v in inputs.items()}
    graph = pk.DependencyGraph(dense, example)

    variants = {}                       # name -> (model, description)
    for r in (0.3, 0.5):
        res = pk.prune(dense, pk.Structured(ratio=r), example_inputs=example, graph=graph)
        variants[f"prunekit heads/FFN {r:.0%}"] = (res.model, f"pk.Structured(ratio={r})")
    tp_error = None
    if not args.skip_tp:
        log(f"Torch-Pruning MetaPruner, ratio {args.tp_ratio}")
        tp_model, tp_error = torch_pruning_bert(dense, example, args.tp_ratio)
        if tp_model is not None:
            variants[f"Torch-Pruning ratio {args.tp_ratio}"] = (tp_model, "tp.pruner.MetaPruner BERT recipe")
        else:
            log(f"  Torch-Pruning failed: {tp_error}")
    grid = {}
    if f"Torch-Pruning ratio {args.tp_ratio}" in variants:
        for r in MATCH_GRID:
            res = pk.prune(dense, pk.Structured(target=pk.MACs(ratio=r)), example_inputs=example, graph=graph)
            grid[f"prunekit MACs -{r:.0%}"] = (res.model, f"pk.Structured(target=pk.MACs({r}))")

    models = {"dense": dense, **{k: v[0] for k, v in variants.items()}, **{k: v[0] for k, v in grid.items()}}
    log(f"timing {len(models)} models interleaved: batch {demo_prune.LATENCY_BATCH} x {demo_prune.LATENCY_TOKENS} tokens, "
        f"1 thread, {args.reps} reps")
    lat = pk.measure_latency(models, inputs, batch_sizes=(demo_prune.LATENCY_BATCH,), threads=1, warmup=2, reps=args.reps)
    ms = {r["model"]: r["median_ms"] for r in lat["rows"]}

    timed_as = {name: name for name in models}           # report row -> its row in the latency run
    if grid:
        tp_name = f"Torch-Pruning ratio {args.tp_ratio}"
        match = min(grid, key=lambda k: abs(ms[k] - ms[tp_name]))
        name = f"prunekit at TP latency ({match.split()[-1]} MACs)"
        variants[name] = grid[match]
        timed_as[name] = match

    rows = []
    for name, (model, how) in [("dense", (dense, "all-MiniLM-L6-v2"))] + list(variants.items()):
        log(f"Lee similarity: {name}")
        lee = suite.run(model, names=("lee",))["lee"].value
        t = lat.get_row(timed_as[name], demo_prune.LATENCY_BATCH)
        rows.append({"variant": name, "how": how, "params": pk.count_params(model),
                     "hidden": int(model.embeddings.word_embeddings.weight.shape[1]),
                     "latency_ms": t["median_ms"], "iqr_ms": t["iqr_ms"],
                     "latency_vs_dense": t["median_ms"] / ms["dense"], "lee_pearson": lee})
    lines = ["| variant | params | hidden | latency ms (32x32, 1 thr) | latency vs dense | Lee Pearson |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['hidden']} | {r['latency_ms']:.1f} | "
                     f"{r['latency_vs_dense']:.2f}x | {r['lee_pearson']:.3f} |")
    env = pk.environment_info()
    lines.append(f"\n_{env['cpu_model']}, torch {env['torch']}, {args.reps} interleaved reps; no recovery "
                 f"after pruning; Lee Pearson over 1225 pairs (dense reference 0.656)_")
    if tp_error:
        lines.append(f"\nTorch-Pruning could not prune this model: {tp_error}")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "markdown": "\n".join(lines), "latency": lat, "grid_ms": {k: ms[k] for k in grid},
                       "torch_pruning_error": tp_error, "env": env}, f, indent=1, default=str)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Structured width and depth pruning of the real SmolLM2-135M (Llama, 9 query / 3 KV heads, 30 layers).

Before any recovery: Austen perplexity (non-overlapping 512-token windows; calibration windows come first in
the text, evaluation windows after them) of dense vs
  * width (heads as whole KV groups + FFN neurons) at 20% and 35% with magnitude (L2), Taylor,
    activation-magnitude (Minitron-style) and FLAP fluctuation (with bias compensation) scores,
  * depth (drop 4 and 8 blocks) by block influence and angular distance,
and measured prefill latency (generate()'s first step: KV cache on, logits of the last position only;
1 thread, interleaved, median) dense vs 25% width cuts (heads + FFN; query heads
within KV groups + FFN; hidden size + heads + FFN).

    python benchmarks/llm_structured.py --calib 8 --windows 8 --out benchmarks/results/llm_structured.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_sparse as L  # noqa: E402  (shared SmolLM2 loader, Austen windows, perplexity)

import prunekit as pk  # noqa: E402
from prunekit.measure import prefill_kwargs  # noqa: E402
from prunekit.structured import importance as I  # noqa: E402


def width(model, calib, ratio, importance):
    x = {"input_ids": calib[0][:, :128]}
    imp = {"magnitude": "l2",
           "taylor": I.Taylor(data=[{"input_ids": c, "labels": c} for c in calib], batches=len(calib)),
           "activation": I.Activation(kind="mean", data=[{"input_ids": c} for c in calib],
                                                  batches=len(calib)),
           "flap": I.Fluctuation(data=[{"input_ids": c} for c in calib], batches=len(calib))}[importance]
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = pk.prune(model, pk.Structured(ratio=ratio, importance=imp), example_inputs=x)
    return r.model, time.perf_counter() - t


def depth(model, calib, n, importance):
    t = time.perf_counter()
    r = pk.prune(model, pk.Layers(n=n, importance=importance), data=[c for c in calib])
    return r.model, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/llm_structured.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = L.load_model()
    calib, evalw, n_tokens = L.data_split(tok, args.calib, args.windows)
    rows = [{"method": "dense", "params_M": pk.count_params(model) / 1e6, "ppl": L.perplexity(model, evalw),
             "prune_s": 0.0}]
    print(rows[-1], flush=True)
    for ratio in (0.2, 0.35):
        for imp in ("magnitude", "taylor", "activation", "flap"):
            m, dt = width(model, calib, ratio, imp)
            rows.append({"method": f"width {int(ratio * 100)}% ({imp})", "params_M": pk.count_params(m) / 1e6,
                         "ppl": L.perplexity(m, evalw), "prune_s": dt})
            print(rows[-1], flush=True)
            del m
    for n in (4, 8):
        for imp in ("block_influence", "angular"):
            m, dt = depth(model, calib, n, imp)
            rows.append({"method": f"depth -{n} layers ({imp})", "params_M": pk.count_params(m) / 1e6,
                         "ppl": L.perplexity(m, evalw), "prune_s": dt})
            print(rows[-1], flush=True)
            del m
    # prefill latency of 25% width cuts: heads+FFN (KV groups), query heads within groups, and with hidden dim
    x = {"input_ids": calib[0][:, :128]}
    taylor = I.Taylor(data=[{"input_ids": c, "labels": c} for c in calib], batches=len(calib))
    variants = {"dense": model}
    for name, cfg in [("heads+FFN 25%", pk.Structured(ratio=0.25, importance=taylor)),
                      # 25% cannot split 3 KV groups: one group of three (33% of attention) + 25% of FFN neurons
                      ("1 KV group+FFN 25%", pk.Structured(ratio={r".*self_attn.*": 0.34, r".*mlp.*": 0.25},
                                                           importance=taylor)),
                      ("query heads+FFN 34%", pk.Structured(ratio=0.34, gqa="query_heads", importance=taylor)),
                      ("hidden+heads+FFN 25%", pk.Structured(ratio=0.25, prune_hidden=True, importance=taylor))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = pk.prune(model, cfg, example_inputs=x)
        variants[name] = r.model
        rows.append({"method": f"width {name} (taylor)", "params_M": pk.count_params(r.model) / 1e6,
                     "ppl": L.perplexity(r.model, evalw), "prune_s": r.stats["time_total_s"]})
        print(rows[-1], flush=True)
    prompt = calib[0][:, :256]
    # a generation prefill: KV cache on, next-token logits for the last position only (what generate() runs)
    prefill = {"input_ids": prompt, **prefill_kwargs(model)}
    lat = pk.measure_latency(variants, prefill, batch_sizes=[1], threads=1, warmup=1, reps=5)
    speed = {n: lat.speedup("dense", n, 1) for n in variants if n != "dense"}
    md = ["| method | params (M) | Austen ppl | prune s |", "|---|---:|---:|---:|"]
    md += [f"| {r['method']} | {r['params_M']:.1f} | {r['ppl']:.2f} | {r['prune_s']:.1f} |" for r in rows]
    md.append("\nPrefill latency (256-token prompt, batch 1, KV cache on, last-position logits as in generate(), "
              "1 thread, interleaved medians):\n\n| variant | ms | speedup |\n"
              "|---|---:|---:|")
    for n in variants:
        md.append(f"| {n} | {lat.get_row(n, 1)['median_ms']:.0f} | {lat.speedup('dense', n, 1):.2f}x |")
    md.append(f"\n_{args.calib} calibration + {args.windows} evaluation windows of {L.WINDOW} tokens "
              f"(stride {L.WINDOW}, non-overlapping) from '{L.BOOK}' ({n_tokens} tokens); no recovery._")
    text = "\n".join(md)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "prefill_speedup": speed,
                                          "latency": lat, "markdown": text}, indent=1, default=str))


if __name__ == "__main__":
    main()

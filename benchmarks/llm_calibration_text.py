"""How much the *form* of the calibration text moves a data-aware width prune of SmolLM2-135M.

    python benchmarks/llm_calibration_text.py --out benchmarks/results/llm_calibration_text.json   (~5 min, 1 thread)

One prune, five calibration sets of --windows x 512 tokens (default 4), the same config every time (pk.Structured with first-order
Taylor importance: one of 3 KV groups and 25% of the FFN per layer, as benchmarks/gguf.py's "width"):
    P&P lines        "Pride and Prejudice" as printed: its lines joined by newlines (a line break every ~70 chars)
    P&P lines, next windows   the 4 windows after those (is it the form, or which 2k tokens were drawn?)
    Emma lines       another novel, as printed
    P&P paragraphs   the same book's paragraphs (lines joined by spaces), each followed by a blank line
    recovery paragraphs   pk.data.recovery_texts(): paragraphs of the five non-held-out novels, interleaved by book
Each pruned model (no recovery) is evaluated on 4 x 512 tokens of the held-out "Persuasion" in both forms.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import prunekit as pk  # noqa: E402
from prunekit.data import lm  # noqa: E402
from prunekit.measure.env import environment_info  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))
from smollm2 import load_model  # noqa: E402

W = 512


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="calibration and evaluation windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, tok = load_model()
    books = pk.data.austen_books()

    def lines(book, skip=0):
        ids = tok("\n".join(books[book]), return_tensors="pt").input_ids[0]
        return [ids[(skip + i) * W:(skip + i + 1) * W][None] for i in range(a.windows)]

    def paras(docs, name):              # documents joined by blank lines, cut into windows (as the LM slices are)
        return [w[None] for w in lm._windows(docs, tok, W, a.windows, name)]

    calibs = {"P&P lines": lines("prideprejudice"),
              "P&P lines, next windows": lines("prideprejudice", skip=a.windows),
              "Emma lines": lines("emma"),
              "P&P paragraphs": paras(lm.paragraphs(books["prideprejudice"], min_chars=80), "P&P paragraphs"),
              "recovery paragraphs": paras(lm.recovery_texts(), "recovery paragraphs")}
    evals = {"Persuasion lines": lines("persuasion"),
             "Persuasion paragraphs": paras(lm.paragraphs(books["persuasion"], min_chars=80), "Persuasion paragraphs")}

    def ppl(m, ws):
        return pk.evaluate(m, pk.TokenWindows(torch.cat(ws, 1), W, batch_size=1), metric="perplexity").value

    rows = {"dense": {e: ppl(model, w) for e, w in evals.items()}}
    print("dense", rows["dense"], flush=True)
    for name, cal in calibs.items():
        imp = pk.Taylor(data=[{"input_ids": c, "labels": c} for c in cal], batches=len(cal))
        cfg = pk.Structured(ratio={".*self_attn.*": 0.34, ".*mlp.*": 0.25}, importance=imp)
        r = pk.prune(copy.deepcopy(model), cfg, example_inputs={"input_ids": cal[0][:, :64]})
        rows[name] = {e: ppl(r.model, w) for e, w in evals.items()}
        print(name, rows[name], flush=True)
    result = {"command": "python benchmarks/llm_calibration_text.py " + " ".join(sys.argv[1:]), "rows": rows,
              "windows": a.windows, "window": W, "seconds": time.perf_counter() - t0, "env": environment_info()}
    print(f"| calibration ({a.windows} x {W} tokens) | " + " | ".join(evals) + " |")
    print("|---|" + "---:|" * len(evals))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[e]:.1f}" for e in evals) + " |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()

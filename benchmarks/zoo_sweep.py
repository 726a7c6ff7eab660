"""Sweep every torchvision classification model through the structural invariants; write docs/coverage.md.

For each model (weights=None): ratio 0 is bit-identical, ratio 0.5 runs with the same output shape and fewer
params and MACs, and zeroed channels prune away without changing outputs. The same checks as the `slow`
pytest marker (`make test-all`), in one process with a table at the end.

    python benchmarks/zoo_sweep.py --out docs/coverage.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import check_prunes, check_ratio_zero_identical, check_save_load, check_zero_channel_equivalence  # noqa
from test_torchvision import build  # noqa


def run(name):
    m, x = build(name)
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        check_ratio_zero_identical(m, x)
        r = check_prunes(m, x, ratio=0.5)
        check_zero_channel_equivalence(m, x, rtol=1e-4 if name.startswith(("vit", "swin", "maxvit")) else 1e-5)
        fresh, _ = build(name)
        with tempfile.TemporaryDirectory() as d:
            check_save_load(r, fresh, x, Path(d))
    auto = "; ".join(a.split(":")[0] for a in r.stats["auto_ignored"])
    return {"params": f"{r.stats['params_before'] / 1e6:.1f}M -> {r.stats['params_after'] / 1e6:.1f}M",
            "macs": f"{r.stats['macs_before'] / max(r.stats['macs_after'], 1):.2f}x",
            "time": time.perf_counter() - t, "auto_ignored": auto or "-"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--out", default="docs/coverage.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows = []
    for n in names:
        try:
            res = run(n)
            rows.append((n, "pass", res))
        except Exception as e:
            traceback.print_exc()
            rows.append((n, f"FAIL: {type(e).__name__}: {str(e)[:100]}", {}))
        print(n, rows[-1][1], rows[-1][2], flush=True)
        write(rows, len(names), args.out)


def write(rows, total, out):
    ok = sum(r[1] == "pass" for r in rows)
    lines = [f"| model | result | params (ratio 0.5) | MACs reduction | modules left untouched | time s |",
             "|---|---|---|---|---|---|"]
    for n, st, res in rows:
        lines.append(f"| {n} | {st} | {res.get('params', '')} | {res.get('macs', '')} | "
                     f"{res.get('auto_ignored', '')} | {res.get('time', 0):.1f} |")
    table = "\n".join(lines)
    out = Path(out)
    done = "" if len(rows) == total else f" (sweep in progress or cut short: {len(rows)} of {total} models run)"
    head = out.read_text().split("<!-- sweep -->")[0] if out.exists() else "# Coverage\n\n"
    out.write_text(head + "<!-- sweep -->\n" + f"Latest sweep: {ok}/{len(rows)} torchvision classification models pass "
                   f"every invariant{done} (`python benchmarks/zoo_sweep.py`, {time.strftime('%Y-%m-%d')}, torch "
                   f"{torch.__version__}, torchvision {torchvision.__version__}).\n\n" + table + "\n")


if __name__ == "__main__":
    main()

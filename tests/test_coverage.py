"""benchmarks/coverage.py: a few families in `make test`, every family under the slow marker (`make test-all`).

Each cell must be ok, not applicable, or a clean prunekit error; a traceback or a silent wrong result fails.
"""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torchvision")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark(name):
    """Import benchmarks/<name>.py under a private module name, with benchmarks/ on sys.path only while it
    loads: left there, it would shadow real packages for every later test (benchmarks/gguf.py hid the
    `gguf` package, benchmarks/coverage.py hides coverage.py)."""
    import importlib.util
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


cov = _load_benchmark("coverage")
FAMILIES, FAST = sys.modules["coverage_models"].FAMILIES, sys.modules["coverage_models"].FAST


def check_row(row):
    for step in cov.STEPS:
        status, detail = row[step]
        assert status not in ("bug", "wrong"), f"{row['name']} {step}: {status}: {detail}"


@pytest.mark.parametrize("name", FAST)
def test_fast_subset(name):
    row = cov.run_family(name)
    check_row(row)
    if row["category"] == "hf moe":          # experts are not graph channels: pk.Experts prunes them
        assert row["experts"][0] == "ok", row["experts"]
    else:
        assert row["structured"][0] == "ok", row["structured"]
        assert row["save_load"][0] == "ok", row["save_load"]


def test_zeroed_dense_detects_a_wrong_cut():
    """The silent-wrong check is real: a model whose kept slices are mislabelled is reported."""
    import torch
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).eval()
    x = torch.randn(5, 4)
    kept = {"0.weight": {"0": [0, 1, 2]}, "0.bias": {"0": [0, 1, 2]}, "2.weight": {"1": [0, 1, 2]}}
    z = cov.zeroed_dense(m, kept)
    cut = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3)).eval()
    with torch.no_grad():
        cut[0].weight.copy_(m[0].weight[:3]), cut[0].bias.copy_(m[0].bias[:3])
        cut[2].weight.copy_(m[2].weight[:, :3]), cut[2].bias.copy_(m[2].bias)
        assert cov.rel_err(cov.tensors(cut(x)), cov.tensors(z(x))) < 1e-6
        cut[2].weight.copy_(m[2].weight[:, 3:])          # wrong columns: must be caught
        assert cov.rel_err(cov.tensors(cut(x)), cov.tensors(z(x))) > 1e-3


@pytest.mark.slow
def test_all_families(tmp_path):
    tot = cov.main(["--jobs", "2", "--md", str(tmp_path / "coverage.md"), "--json", str(tmp_path / "coverage.json")])
    rows = json.loads((tmp_path / "coverage.json").read_text())["rows"]
    assert len(rows) == len(FAMILIES)
    assert tot["all"]["wrong_cells"] == 0, [r["name"] for r in rows if any(r[s][0] == "wrong" for s in cov.STEPS)]
    assert tot["all"]["bug_cells"] == 0, [r["name"] for r in rows if any(r[s][0] == "bug" for s in cov.STEPS)]
    assert "coverage.py:begin" in (tmp_path / "coverage.md").read_text()

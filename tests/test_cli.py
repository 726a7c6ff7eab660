"""The prunekit command line: help, end-to-end prune -> eval -> bench -> report, and input errors."""
import json
import subprocess
import sys
import textwrap

import pytest

from prunekit import cli

FACTORIES = textwrap.dedent('''
    import torch, torch.nn as nn
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    def data(split="train", batch_size=16, limit=None):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        x = torch.randn(48, 1, 6, 6, generator=g)
        y = (x.mean((1, 2, 3)) > 0).long()
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, 48, batch_size)]
''')


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "cli_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "prunekit.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("prune", "eval", "bench", "report"):
        assert cmd in out.stdout


def test_prune_eval_bench_report_end_to_end(factories, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", """
        batch_size: 16
        stages:
          - prune: {type: Structured, ratio: 0.5}
          - recover: {epochs: 1, lr: 0.01}
          - evaluate: {metric: accuracy}
        """)
    out = tmp_path / "run"
    rc = cli.main(["prune", "--model", "cli_factories:model", "--data", "cli_factories:data", "--recipe", recipe,
                   "--out", str(out), "--quiet"])
    assert rc == 0 and (out / "model" / "plan.json").exists()
    capsys.readouterr()
    assert cli.main(["eval", "--model", "cli_factories:model", "--data", "cli_factories:data",
                     "--pruned", str(out / "model")]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["metric"] == "accuracy" and 0 <= ev["value"] <= 1 and ev["params"] < 120
    assert cli.main(["bench", "--model", "cli_factories:model", "--input-shape", "1,1,6,6", "--pruned",
                     str(out / "model"), "--batch-sizes", "2", "--reps", "2"]) == 0
    assert "pruned" in capsys.readouterr().out
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report" / "report.html").exists()
    # the same --out again without --resume is refused, with the fix in the message
    rc = cli.main(["prune", "--model", "cli_factories:model", "--data", "cli_factories:data", "--recipe", recipe,
                   "--out", str(out), "--quiet"])
    assert rc == 2 and "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--model", "no/such/model.safetensors"], "does not exist"),
    (["--data", "fashion-mnistt"], "Did you mean 'fashion-mnist'"),
    (["--recipe", "missing.yaml"], "--recipe: file 'missing.yaml' does not exist"),
])
def test_bad_inputs_exit_2_with_clear_message(factories, tmp_path, capsys, args, needle):
    recipe = write(tmp_path / "ok.yaml", "stages: [{prune: {type: Structured, ratio: 0.5}}]\n")
    base = {"--model": "cli_factories:model", "--data": "cli_factories:data", "--recipe": recipe,
            "--out": str(tmp_path / "o")}
    base.update(dict(zip(args[::2], args[1::2])))
    rc = cli.main(["prune", "--quiet", *[x for kv in base.items() for x in kv]])
    assert rc == 2 and needle in capsys.readouterr().err


def test_unknown_recipe_key_and_wrong_type(factories, tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "stages: [{prune: {type: Structured, ratoi: 0.5}}]\n")
    rc = cli.main(["prune", "--model", "cli_factories:model", "--data", "cli_factories:data", "--recipe", bad,
                   "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "did you mean 'ratio'" in capsys.readouterr().err
    wrong = write(tmp_path / "wrong.yaml", "stages: [{recover: {epochs: 1, lr: -1}}]\n")
    rc = cli.main(["prune", "--model", "cli_factories:model", "--data", "cli_factories:data", "--recipe", wrong,
                   "--out", str(tmp_path / "o2"), "--quiet"])
    assert rc == 2 and "Recover.lr" in capsys.readouterr().err


def test_report_of_missing_run_dir(capsys):
    assert cli.main(["report", "/nonexistent/run"]) == 2
    assert "does not exist" in capsys.readouterr().err

"""The README's quickstart runs as written (issue 9: the README's calls keep working through the redesign)."""
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_block_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    code = blocks[0]
    assert "pk.prune(" in code and "pk.save(" in code and "pk.load(" in code
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)        # noqa: S102 (our own README)
    again, model = namespace["again"], namespace["model"]
    assert os.path.isdir(tmp_path / "out" / "resnet50-half")
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in model.parameters())
    table = namespace["lat"].to_markdown()
    assert "dense" in table and "pruned" in table

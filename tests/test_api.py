"""The public verb: context keywords are checked once for every handler; optional packages load only when used."""
import subprocess
import sys

import pytest
import torch

import prunekit as pk
from helpers import TwoLinear


@pytest.mark.parametrize("config,kwargs,closest", [
    (pk.Structured(ratio=0.5), {"example_input": torch.randn(2, 6)}, "example_inputs"),
    (pk.Sparse(sparsity=0.5, method="magnitude"), {"inplcae": True}, "inplace"),
    (pk.Layers(n=1), {"dta": []}, "data"),
])
def test_misspelled_context_keyword_names_the_closest_valid_one(config, kwargs, closest):
    model = TwoLinear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pk.ConfigError, match=f"did you mean '{closest}'"):
        pk.prune(model, config, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_valid_context_keywords_still_work():
    r = pk.prune(TwoLinear(), pk.Sparse(sparsity=0.5, method="magnitude"), inplace=False)
    assert r.stats["sparsity_total"] == pytest.approx(0.5, abs=0.05)


def test_structured_prune_of_a_torchvision_model_imports_no_optional_package():
    pytest.importorskip("torchvision")
    code = ("import sys, torch, torchvision, prunekit as pk\n"
            "m = torchvision.models.resnet50(weights=None).eval()\n"
            "pk.prune(m, pk.Structured(ratio=0.3), example_inputs=torch.randn(1, 3, 64, 64))\n"
            "print(sorted(h for h in ('transformers', 'matplotlib', 'onnx') if h in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout

"""The typed, versioned Plan: JSON round trip, field validation, and plans saved before the Plan class."""
import json

import pytest
import torch

import prunekit as pk
from prunekit.errors import LoadError
from prunekit.plan import Plan, plan_format
from helpers import TwoLinear


def test_structured_plan_round_trips_through_json():
    torch.manual_seed(0)
    res = pk.prune(TwoLinear(), pk.Structured(ratio=0.5), example_inputs=torch.randn(2, 6))
    assert isinstance(res.plan, Plan) and res.plan.kind == "structured"
    d = json.loads(json.dumps(res.plan.to_dict()))
    assert d["format"] == plan_format("structured") == "prunekit.structured/1"
    back = Plan.from_dict(d)
    assert back == res.plan
    assert len(back.kept["a.weight"]["0"]) == 4 and back.groups[0]["kept"] == 4


@pytest.mark.parametrize("key,value", [("kept", [1, 2]), ("attrs", {"x": 1}), ("removed_layers", ["1"]),
                                       ("hf_config_exact", "yes"), ("blocks", 3)])
def test_wrong_field_type_names_the_field(key, value):
    with pytest.raises(LoadError, match=f"field '{key}'"):
        Plan.from_dict({"format": "prunekit.structured/1", key: value})


def test_unknown_field_and_format_are_load_errors():
    with pytest.raises(LoadError, match="unknown field 'kep'"):
        Plan.from_dict({"format": "prunekit.structured/1", "kep": {}})
    with pytest.raises(LoadError, match="'format' is 'prunekit.structured/9'"):
        Plan.from_dict({"format": "prunekit.structured/9"})
    with pytest.raises(LoadError, match="no 'format'"):
        Plan.from_dict({"attrs": []})


def test_directory_saved_before_the_plan_class_still_loads(tmp_path):
    torch.manual_seed(0)
    model = TwoLinear()
    res = pk.prune(model, pk.Structured(ratio=0.5), example_inputs=torch.randn(2, 6))
    pk.save(res, tmp_path)
    old = {"format": "prunekit.structured/1",                     # the dict handler.py wrote before
           "config": res.config.to_dict(), "kept": res.plan.kept, "attrs": res.plan.attrs,
           "groups": res.plan.groups}
    (tmp_path / "plan.json").write_text(json.dumps(old))
    again = pk.load(tmp_path, model=TwoLinear(), verify=False)     # the manifest's checksum is of the new file
    x = torch.randn(5, 6)
    torch.testing.assert_close(again(x), res.model(x))


def test_old_sparse_plan_with_type_key_loads():
    p = Plan.from_dict({"format": "prunekit.sparse/1", "type": "Sparse", "layers": {"a": {"sparsity": 0.5}},
                        "owl": None, "allocation": None, "blocks": None, "config": {"type": "Sparse"}})
    assert p.kind == "sparse" and p.is_empty and p.layers["a"]["sparsity"] == 0.5

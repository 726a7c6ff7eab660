"""Every registered config class survives to_dict -> YAML -> JSON -> config_from_dict unchanged."""
import json

import pytest
import yaml

import prunekit as pk
import prunekit.run.pipeline  # noqa: F401
import prunekit.run.schedule  # noqa: F401
import prunekit.sparse  # noqa: F401
import prunekit.structured.importance  # noqa: F401  (registers the importance configs)
from prunekit.config import _CONFIGS, config_from_dict

# configs whose defaults are not valid on their own, with a typical non-default instance
SAMPLES = {
    "Iterative": lambda C: C(prune=pk.Structured(ratio=0.5, importance=prunekit.structured.importance.Taylor(batches=2)),
                             steps=2, recover=pk.Recover(epochs=2), max_drop=0.01),
    "Recipe": lambda C: C(stages=[{"prune": {"type": "Structured", "ratio": 0.3}}, {"recover": {"epochs": 1}},
                                  {"evaluate": {"max_drop": 0.02}}], seed=4),
    "Structured": lambda C: C(ratio={"layer.*": 0.4}, importance=prunekit.structured.importance.Activation(kind="apoz"),
                              target=pk.Latency(speedup=2.0), ignore=["fc"]),
    "OneShot": lambda C: C(prune=pk.Sparse(sparsity=0.3), recover=pk.Recover(epochs=1), max_drop=0.05),
    "Gradual": lambda C: C(sparsity=0.8, steps=3, prune=pk.sparse.Sparse(method="wanda")),
}


def instance(name):
    cls = _CONFIGS[name]
    return SAMPLES[name](cls) if name in SAMPLES else cls()


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_yaml_and_json_round_trip(name):
    cfg = instance(name)
    d = cfg.to_dict()
    via_yaml = config_from_dict(yaml.safe_load(yaml.safe_dump(d)))
    via_json = config_from_dict(json.loads(json.dumps(d)))
    assert type(via_yaml) is type(cfg)
    assert via_yaml.to_dict() == d and via_json.to_dict() == d


def test_registry_has_the_pipeline_configs():
    for name in ("Structured", "Sparse", "Recover", "Latency", "Taylor", "Activation", "BNScale", "Magnitude",
                 "Random", "Iterative", "OneShot", "Gradual", "EvalStage", "Recipe", "MACs", "Params"):
        assert name in _CONFIGS, name


def test_unknown_key_names_closest_and_runtime_fields_are_not_serialized():
    with pytest.raises(pk.ConfigError, match="did you mean 'speedup'"):
        config_from_dict({"type": "Latency", "speedupp": 2})
    d = prunekit.structured.importance.Taylor(data=[1, 2], batches=3).to_dict()
    assert "data" not in d and "loss_fn" not in d and d["batches"] == 3


def test_evaluate_stage_loads_under_its_old_name_and_one_shot_is_one_step():
    assert type(config_from_dict({"type": "Evaluate", "metric": "accuracy", "max_drop": 0.1})) is pk.EvalStage
    one = pk.OneShot(pk.Structured(ratio=0.5), pk.Recover(epochs=1))
    assert isinstance(one, pk.Iterative) and one.steps == 1 and one.recover.epochs == 1
    assert "steps" not in one.to_dict()
    with pytest.raises(pk.ConfigError, match="unknown key 'steps' for OneShot"):
        config_from_dict({**one.to_dict(), "steps": 3})

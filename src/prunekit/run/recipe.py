"""Recipes as data: a YAML/JSON list of stages read safely (size, encoding, aliases, depth) into a `Recipe`.

Each stage is a one-key mapping whose value is the config dataclass the Python API uses (`prune:`,
`recover:`, `evaluate:`, `schedule:`), plus `export:` stages (`prunekit.run.export.Export`) that may only
come last: they write the final model for a serving engine (GGUF for llama.cpp, ONNX, safetensors).
`prunekit.run.pipeline` runs a Recipe; its docstring shows a whole recipe.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from prunekit.config import Config, bounded, check_type, config_from_dict, register_config
from prunekit.errors import ConfigError
from prunekit.run.export import Export
from prunekit.run.schedule import Step, expand

STAGE_KINDS = ("prune", "recover", "evaluate", "schedule", "export")
_STAGE_DEFAULT_TYPE = {"recover": "Recover", "evaluate": "EvalStage", "export": "Export"}
_STAGE_OPTIONS = {"prune": ("allocation",), "schedule": ("allocation",), "recover": (), "evaluate": (),
                  "export": ()}
ALLOCATIONS = ("ratio", "sensitivity")


@register_config
@dataclasses.dataclass
class Recipe(Config):
    """A pruning job: global options and `stages` (one-key mappings, see the module docstring)."""
    stages: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    seed: int = bounded(0, ge=0)
    batch_size: int = bounded(64, ge=1)
    train_limit: Optional[int] = bounded(4096, ge=1)
    val_limit: Optional[int] = bounded(2000, ge=1)
    calibration_batches: int = bounded(8, ge=1)
    distill: bool = True

    def __post_init__(self):
        for n in ("seed", "batch_size", "calibration_batches"):
            check_type("Recipe", n, getattr(self, n), int, "an int")
        for n in ("train_limit", "val_limit"):
            v = getattr(self, n)
            if v is not None:
                check_type("Recipe", n, v, int, "a positive int or null")
        check_type("Recipe", "distill", self.distill, bool, "true or false")
        if not isinstance(self.stages, list) or not self.stages:
            raise ConfigError("Recipe.stages must be a non-empty list of stages, e.g. "
                              "[{prune: {type: Structured, ratio: 0.5}}, {recover: {epochs: 1}}]")
        self.stages = [normalize_stage(s, i) for i, s in enumerate(self.stages)]
        kinds = [next(k for k in st if k in STAGE_KINDS) for st in self.stages]
        if "export" in kinds and any(k != "export" for k in kinds[kinds.index("export"):]):
            raise ConfigError(f"Recipe.stages[{kinds.index('export')}]: export stages must come last (they write "
                              f"the final model); move the {kinds[-1]} stage before it")
        if all(k == "export" for k in kinds):
            raise ConfigError("Recipe.stages holds only export stages; add the prune/recover/evaluate stages "
                              "whose result they export")

    def exports(self) -> List[Export]:
        """The export stages, in order: run on the final model after every step completed."""
        return [st["export"] for st in self.stages if "export" in st]

    def steps(self) -> List[Step]:
        out = []
        for i, st in enumerate(self.stages):
            kind = next(k for k in st if k in STAGE_KINDS)
            if kind == "export":
                continue
            opts = {k: v for k, v in st.items() if k != kind}
            out += expand(st[kind], label=f"stage {i + 1} {kind}", options=opts)
        return out


def normalize_stage(stage: Any, i: int) -> Dict[str, Any]:
    """One stage as {kind: config object, option: value}; errors name the stage and the closest key."""
    where = f"Recipe.stages[{i}]"
    if not isinstance(stage, dict):
        raise ConfigError(f"{where} must be a mapping like {{prune: {{type: Structured, ratio: 0.5}}}}, got {stage!r}")
    kinds = [k for k in stage if k in STAGE_KINDS]
    if len(kinds) != 1:
        unknown = [k for k in stage if k not in STAGE_KINDS]
        close = difflib.get_close_matches(str(unknown[0]), STAGE_KINDS, n=1) if unknown and not kinds else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where} must have exactly one of {STAGE_KINDS}, got keys {sorted(stage)}{hint}")
    kind = kinds[0]
    out: Dict[str, Any] = {}
    for k, v in stage.items():
        if k == kind:
            continue
        if k not in _STAGE_OPTIONS[kind]:
            valid = list(_STAGE_OPTIONS[kind])
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key '{k}' for a {kind} stage{hint} Valid: {valid}")
        if k == "allocation" and v not in ALLOCATIONS:
            raise ConfigError(f"{where}.allocation must be one of {ALLOCATIONS}, got {v!r}")
        out[k] = v
    cfg = stage[kind]
    if cfg is None:
        cfg = {}
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        if "type" not in cfg:
            if kind not in _STAGE_DEFAULT_TYPE:
                raise ConfigError(f"{where}.{kind} needs a 'type' (e.g. Structured, Sparse, Iterative, Gradual)")
            cfg["type"] = _STAGE_DEFAULT_TYPE[kind]
        try:
            cfg = config_from_dict(cfg)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}.{kind}: {e}") from e
    if not isinstance(cfg, Config):
        raise ConfigError(f"{where}.{kind} must be a config mapping, got {cfg!r}")
    out[kind] = cfg
    return out


MAX_RECIPE_BYTES = 1 << 20          # a recipe is a few hundred bytes; anything near a MiB is not one
MAX_RECIPE_DEPTH = 32               # stages > stage > config > importance > ... is about 6 deep


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (no billion-laughs expansion: `*a` is an error, anchors alone are
    harmless) and nesting deeper than MAX_RECIPE_DEPTH (instead of a RecursionError)."""

    def __init__(self, stream, where: str):
        super().__init__(stream)
        self.where, self.depth = where, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise ConfigError(f"{self.where} line {ev.start_mark.line + 1}: YAML aliases (*{ev.anchor}) are not "
                              f"allowed in recipes; write the value out in full")
        self.depth += 1
        if self.depth > MAX_RECIPE_DEPTH:
            mark = self.peek_event().start_mark
            raise ConfigError(f"{self.where} line {mark.line + 1}: nesting deeper than {MAX_RECIPE_DEPTH} levels; "
                              f"a recipe is a short list of stages (see prunekit.run.pipeline)")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_recipe_file(path: Union[str, Path]) -> Any:
    """Parse a YAML/JSON recipe file safely: size-limited, UTF-8 only, no aliases, bounded nesting."""
    p = Path(path)
    where = f"recipe '{p}'"
    if not p.is_file():
        raise ConfigError(f"{where}: file not found (or not a regular file); pass the path of a YAML/JSON recipe")
    if p.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"{where} is {p.stat().st_size} bytes, over the {MAX_RECIPE_BYTES}-byte limit for "
                          f"recipes; is this the right file?")
    raw = p.read_bytes()[:MAX_RECIPE_BYTES + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); save it "
                          f"as UTF-8") from None
    loader = None
    try:
        loader = _RecipeLoader(text, where)
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML/JSON: " + " ".join(str(e).split())) from None
    finally:
        if loader is not None:
            loader.dispose()


def load_recipe(path_or_dict: Union[str, Path, Dict[str, Any]]) -> Recipe:
    """A Recipe from a YAML/JSON file or a dict (`type: Recipe` optional)."""
    if isinstance(path_or_dict, (str, Path)):
        d = read_recipe_file(path_or_dict)
    else:
        d = path_or_dict
    if isinstance(d, list):
        d = {"stages": d}
    if not isinstance(d, dict):
        raise ConfigError(f"a recipe must be a mapping with 'stages' (or a list of stages), got {type(d).__name__}")
    d = dict(d)
    d.setdefault("type", "Recipe")
    cfg = config_from_dict(d)
    if not isinstance(cfg, Recipe):
        raise ConfigError(f"expected a Recipe, got a {type(cfg).__name__}")
    return cfg

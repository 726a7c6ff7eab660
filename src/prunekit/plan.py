"""The plan: what a pruning step did, as data that `pk.load` replays on a fresh copy of the original model.

One typed, versioned record for every method. Its JSON form (plan.json in a saved directory, the "plan" of a
run checkpoint) is `Plan.to_dict()`; `Plan.from_dict` reads it back, checking every field's type. The format
string `prunekit.<kind>/<version>` is built only here (`plan_format`), and files written before the Plan
class existed ("prunekit.structured/1", "prunekit.layers/1", "prunekit.sparse/1") have the same layout.

    kind            "structured" (tensors sliced), "layers" (whole blocks dropped), "sparse" (masks; shapes kept)
    config          the config that made it, as a dict (callables written as their repr)
    kept            structured: {tensor name: {dim (str): kept indices}}
    attrs           structured: [[module, attribute, new value], ...] (num_heads, hidden sizes, ...)
    groups          structured: per coupled group {"index", "units", "unit_size", "kept", "modules"}
    convert_mha     nn.MultiheadAttention modules swapped for prunekit.nn.MultiheadAttention before cutting
    add_bias        linear layers that gained a bias from bias compensation
    steps           configs of the structured steps composed into this plan (schedules)
    blocks          layers: dotted path of the block list; sparse: the block-stack prefix
    removed_layers  layers: indices of the dropped blocks in `blocks`
    removed_blocks  layers: dotted names (`<block list>.<index>`) of dropped blocks inside the stages of a
                    hierarchical model (Swin, ConvNeXt, ResNet stages), when they are not all in `blocks`
    layers          sparse: per target layer {"method", "sparsity", "pattern", "shape", "layout"}
    owl, allocation sparse: per-block allocation details (None when uniform)
    experts         sparse: stacked MoE expert weights pruned, {name: {"method", "sparsity"}}
    hf_class, hf_base_config, hf_config_exact: Hugging Face class, its original config, and whether the pruned
                    config can express the new shapes (`from_pretrained` works) -- None/False otherwise
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Optional, Union

from prunekit.errors import LoadError

__all__ = ["Plan", "PLAN_VERSION", "KINDS", "plan_format", "compose_plans", "attach_plan", "plan_of"]

PLAN_VERSION = 1
KINDS = ("structured", "layers", "sparse")
_LEGACY_KEYS = ("type",)          # written by older sparse plans; carries nothing the kind does not


def plan_format(kind: str, version: int = PLAN_VERSION) -> str:
    """The `format` string of a plan of this kind: "prunekit.structured/1" etc."""
    return f"prunekit.{kind}/{version}"


@dataclasses.dataclass
class Plan:
    kind: str = "structured"
    config: Optional[Dict[str, Any]] = None
    # {tensor: {dim: kept indices}}; a stacked expert tensor (E, out, in) keeps its own list per expert
    kept: Dict[str, Dict[str, Union[List[int], List[List[int]]]]] = dataclasses.field(default_factory=dict)
    attrs: List[List[Any]] = dataclasses.field(default_factory=list)
    groups: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    convert_mha: List[str] = dataclasses.field(default_factory=list)
    add_bias: List[str] = dataclasses.field(default_factory=list)
    steps: List[Any] = dataclasses.field(default_factory=list)
    blocks: Optional[str] = None
    removed_layers: List[int] = dataclasses.field(default_factory=list)
    removed_blocks: List[str] = dataclasses.field(default_factory=list)
    layers: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    owl: Optional[Dict[str, Any]] = None
    allocation: Optional[Dict[str, Any]] = None
    experts: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    hf_class: Optional[str] = None
    hf_base_config: Optional[Dict[str, Any]] = None
    hf_config_exact: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LoadError(f"Plan.kind must be one of {KINDS}, got {self.kind!r}; the plan was not written by "
                            f"this prunekit")

    @property
    def format(self) -> str:
        return plan_format(self.kind)

    @property
    def is_empty(self) -> bool:
        """True when replaying it changes nothing (no slices, attributes, dropped layers or conversions)."""
        return not (self.kept or self.attrs or self.removed_layers or self.removed_blocks or self.convert_mha
                    or self.add_bias)

    def kept_by_dim(self) -> Dict[str, Dict[int, List[int]]]:
        """`kept` with integer dims, as `structured.surgery.apply_kept` takes it."""
        return {n: {int(d): list(v) for d, v in dims.items()} for n, dims in self.kept.items()}

    def attr_tuples(self) -> List[tuple]:
        return [tuple(a) for a in self.attrs]

    def to_dict(self) -> Dict[str, Any]:
        """JSON form: {"format": ..., field: value, ...}; empty optional fields are left out."""
        out: Dict[str, Any] = {"format": self.format}
        for f in dataclasses.fields(self):
            if f.name == "kind":
                continue
            v = getattr(self, f.name)
            if f.name in ("kept", "attrs") or (f.name == "removed_layers" and self.kind == "layers") or (v not in (None, [], {}) and not (f.name == "hf_config_exact"
                                                                               and self.hf_class is None)):
                out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> "Plan":
        """Read a plan written by `to_dict` (or by prunekit before the Plan class: same layout, version 1).

        Raises LoadError naming `where` and the offending field when a key is unknown or has the wrong type."""
        if isinstance(d, Plan):
            return d
        if not isinstance(d, dict):
            raise LoadError(f"{where}: expected a JSON object with a 'format' key, got {type(d).__name__}; "
                            f"pass a plan.json written by pk.save")
        kind = _kind_of(d, where)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)} - {"kind"}
        kwargs = {}
        for k, v in d.items():
            if k == "format" or k in _LEGACY_KEYS:
                continue
            if k not in names:
                raise LoadError(f"{where}: unknown field '{k}' (known: {sorted(names)}); the plan was written by "
                                f"a newer or different tool -- upgrade prunekit or re-save the model")
            if not _fits(v, hints[k]):
                raise LoadError(f"{where}: field '{k}' must be {_describe(hints[k])}, got {type(v).__name__}; "
                                f"the plan file is corrupt or was edited by hand")
            kwargs[k] = v
        return cls(kind=kind, **kwargs)


_PLAN_ATTR = "_prunekit_plan"


def attach_plan(model, plan: Optional["Plan"]) -> None:
    """Record on `model` the plan that made it (pk.prune and pk.load do), so that `pk.save(model)` of the bare
    model -- after pk.recover trained it in place, say -- writes the same plan as `pk.save(result)`."""
    if plan is not None:
        object.__setattr__(model, _PLAN_ATTR, plan)


def plan_of(model) -> Optional["Plan"]:
    """The plan `attach_plan` recorded on `model` (None when it has none)."""
    p = getattr(model, _PLAN_ATTR, None)
    return p if isinstance(p, Plan) else None


def compose_plans(first: Optional[Plan], second: Plan) -> Plan:
    """One structured plan equal to applying `first` then `second` to the original architecture.

    `second`'s kept indices are positions in the tensors `first` left; they are mapped back through
    `first` so `prunekit.io.state.replay` can rebuild the final shapes from a fresh original model."""
    first = first or Plan(kind="structured")
    kept = {n: dict(d) for n, d in first.kept.items()}
    for name, dims in second.kept.items():
        for dim, idx in dims.items():
            prev = kept.get(name, {}).get(str(dim))
            kept.setdefault(name, {})[str(dim)] = [prev[i] for i in idx] if prev is not None else list(idx)
    attrs = {(a[0], a[1]): a[2] for a in first.attrs}
    attrs.update({(a[0], a[1]): a[2] for a in second.attrs})
    return Plan(kind="structured", kept=kept, attrs=[[m, a, v] for (m, a), v in attrs.items()],
                convert_mha=list(first.convert_mha) + [n for n in second.convert_mha if n not in first.convert_mha],
                add_bias=list(first.add_bias) + [n for n in second.add_bias if n not in first.add_bias],
                steps=list(first.steps) + [second.config])


def _kind_of(d: Dict[str, Any], where: str) -> str:
    fmt = d.get("format")
    if fmt is None:
        if "kept" in d:                       # the oldest plans had no format: structured
            return "structured"
        raise LoadError(f"{where}: no 'format' entry; expected e.g. {plan_format('structured')!r} -- "
                        f"is this a plan.json written by pk.save?")
    for kind in KINDS:
        for version in range(1, PLAN_VERSION + 1):
            if fmt == plan_format(kind, version):
                return kind
    raise LoadError(f"{where}: field 'format' is {fmt!r}; this prunekit reads "
                    f"{[plan_format(k) for k in KINDS]} -- upgrade prunekit or re-save the model")


def _fits(v: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_fits(v, a) for a in args)
    if hint is type(None):
        return v is None
    if hint is Any:
        return True
    if origin in (list, List):
        return isinstance(v, list) and all(_fits(x, args[0]) for x in v) if args else isinstance(v, list)
    if origin in (dict, Dict):
        return isinstance(v, dict) and all(isinstance(k, str) and _fits(x, args[1]) for k, x in v.items())
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, hint)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "")

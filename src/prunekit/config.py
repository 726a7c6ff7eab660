"""Config dataclasses shared by the Python API, YAML recipes and the CLI.

Every pruning method is one dataclass (torchao style: one verb, one config object). `pk.prune(model, cfg)`
looks up the handler registered for `type(cfg)`. Configs round-trip through plain dicts (`to_dict` /
`config_from_dict`) so recipes and saved runs can describe them in YAML/JSON.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import typing
from typing import Any, Callable, Dict, Type

from prunekit.errors import ConfigError

_CONFIGS: Dict[str, Type["Config"]] = {}
_ALIASES: Dict[str, str] = {}          # older `type:` names still read: alias -> class name


def register_config(cls=None, *, aliases: typing.Sequence[str] = ()):
    """Class decorator (above @dataclass): make a config dataclass known to `config_from_dict` under its class
    name (and under `aliases`, names it had before, so existing recipes keep loading), and check every field
    against its type hint and range metadata at construction (`check_fields`), before the class's own
    `__post_init__` runs."""
    def deco(cls):
        _CONFIGS[cls.__name__] = cls
        _ALIASES.update({a: cls.__name__ for a in aliases})
        inherited = getattr(cls, "__post_init__", None)
        original = getattr(inherited, "__checked_original__", inherited)
        if original is not None:
            def __post_init__(self):
                check_fields(self)
                original(self)
            __post_init__.__checked_original__ = original
            cls.__post_init__ = __post_init__
        else:
            init = cls.__init__

            def __init__(self, *args, **kwargs):
                init(self, *args, **kwargs)
                check_fields(self)
            cls.__init__ = __init__
        return cls
    return deco(cls) if cls is not None else deco


# --------------------------------------------------------------------------------------------- field checks


def bounded(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, **kw):
    """A dataclass field with a numeric range checked by `check_fields` (None values are not range-checked)."""
    return dataclasses.field(default=default, metadata={"range": (ge, gt, le, lt)}, **kw)


_HINTS: Dict[type, Dict[str, Any]] = {}


def _hints(cls) -> Dict[str, Any]:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except (NameError, TypeError):          # a hint this module cannot resolve: check nothing
            _HINTS[cls] = {}
    return _HINTS[cls]


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin is dict:
        return f"a mapping {{{_describe(args[0])}: {_describe(args[1])}}}" if args else "a mapping"
    if origin is collections.abc.Callable or hint is typing.Callable:
        return "a callable"
    return {type(None): "None", bool: "true/false", int: "an int", float: "a finite number", str: "a string",
            }.get(hint, f"a {getattr(hint, '__name__', str(hint))}")


def _matches(v, hint) -> bool:
    """Does `v` fit the type hint? Hints this does not understand accept anything."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_matches(v, a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        seq = isinstance(v, (list, tuple)) or (isinstance(v, str) and args == (str,))   # "x" = ["x"]
        items = [v] if isinstance(v, str) else v
        return seq and (not args or args[-1] is Ellipsis or all(_matches(x, args[0]) for x in items))
    if origin is dict:
        return isinstance(v, dict) and (not args or all(_matches(k, args[0]) and _matches(x, args[1])
                                                        for k, x in v.items()))
    if origin is collections.abc.Callable or hint is typing.Callable:
        return callable(v)
    if hint is type(None):
        return v is None
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if isinstance(hint, type):
        return isinstance(v, hint)
    return True


def _check_range(owner: str, name: str, v, rng) -> None:
    ge, gt, le, lt = rng
    bad = [f">= {ge}" for b in [ge] if b is not None and not v >= b] + \
          [f"> {gt}" for b in [gt] if b is not None and not v > b] + \
          [f"<= {le}" for b in [le] if b is not None and not v <= b] + \
          [f"< {lt}" for b in [lt] if b is not None and not v < b]
    if bad:
        want = " and ".join(s for s in (f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else "",
                                        f"<= {le}" if le is not None else "", f"< {lt}" if lt is not None else "") if s)
        raise ConfigError(f"{owner}.{name} must be {want}, got {v!r}")


def check_fields(obj) -> None:
    """Check every field of a config dataclass against its type hint (NaN/inf are not numbers, strings are not
    numbers, bools are not ints) and its `bounded(...)` range; the ConfigError names the field."""
    owner = type(obj).__name__
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        hint = hints.get(f.name)
        if hint is not None and not _matches(v, hint):
            raise ConfigError(f"{owner}.{f.name} must be {_describe(hint)}, got {v!r} ({type(v).__name__})")
        rng = f.metadata.get("range")
        if rng is not None and v is not None and not isinstance(v, bool) and isinstance(v, (int, float)):
            _check_range(owner, f.name, v, rng)


class Config:
    """Base for config dataclasses: dict round trip and field checks.

    Fields named in `_runtime` (calibration data, loss functions attached at run time) are not part of the
    dict form."""
    _runtime: typing.Tuple[str, ...] = ()

    def to_dict(self, callables: str = "error") -> dict:
        """Plain-data form with a `type` key. callables="error" raises ConfigError on a Python callable (it
        cannot go to YAML/JSON); callables="repr" writes its repr instead (a record, not for loading)."""
        out = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            if f.init and f.name not in self._runtime:
                out[f.name] = _to_plain(getattr(self, f.name), f.name, type(self).__name__, callables)
        return out


def _to_plain(v, name, owner, callables="error"):
    if isinstance(v, Config):
        return v.to_dict(callables)
    if isinstance(v, (list, tuple)):
        return [_to_plain(x, name, owner, callables) for x in v]
    if isinstance(v, dict):
        return {str(k): _to_plain(x, name, owner, callables) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if callable(v) and callables == "repr":
        return repr(v)
    if callable(v):
        raise ConfigError(f"{owner}.{name} is a Python callable ({v!r}); callables cannot be written to YAML/JSON. "
                          f"Use a built-in name instead, or keep this config in Python.")
    raise ConfigError(f"{owner}.{name} has a value of type {type(v).__name__} that cannot be serialized")


def config_from_dict(d: dict) -> "Config":
    """Build a config from a dict with a `type` key (as written by `Config.to_dict`).

    Unknown keys raise ConfigError naming the closest valid key."""
    if not isinstance(d, dict) or "type" not in d:
        raise ConfigError(f"expected a mapping with a 'type' key (one of {sorted(_CONFIGS)}), got {d!r}")
    name = _ALIASES.get(d["type"], d["type"])
    if name not in _CONFIGS:
        close = difflib.get_close_matches(str(name), list(_CONFIGS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config type '{name}'{hint} Known: {sorted(_CONFIGS)}")
    cls = _CONFIGS[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        if k == "type":
            continue
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{k}' for {name}{hint} Valid keys: {sorted(fields)}")
        kwargs[k] = _from_plain(v, hints.get(k))
    return cls(**kwargs)


def _from_plain(v, hint):
    if isinstance(v, dict) and "type" in v and (v["type"] in _CONFIGS or v["type"] in _ALIASES):
        return config_from_dict(v)
    if isinstance(v, list):
        return [_from_plain(x, None) for x in v]
    return v


def check_type(owner: str, name: str, value: Any, types, what: str):
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{owner}.{name} must be {what}, got {value!r} ({type(value).__name__})")


# handler registry: config type -> function(model, config, **context) -> PruneResult
_HANDLERS: Dict[type, Callable] = {}


def register_handler(config_cls):
    def deco(fn):
        _HANDLERS[config_cls] = fn
        return fn
    return deco


def get_handler(cfg) -> Callable:
    for cls in type(cfg).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise ConfigError(f"no pruning handler registered for {type(cfg).__name__}; "
                      f"known configs: {sorted(c.__name__ for c in _HANDLERS)}")

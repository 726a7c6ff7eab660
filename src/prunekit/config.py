"""Config dataclasses shared by the Python API, YAML recipes and the CLI.

Every pruning method is one dataclass (torchao style: one verb, one config object). `pk.prune(model, cfg)`
looks up the handler registered for `type(cfg)`. Configs round-trip through plain dicts (`to_dict` /
`config_from_dict`) so recipes and saved runs can describe them in YAML/JSON.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Callable, Dict, Type

from prunekit.errors import ConfigError

_CONFIGS: Dict[str, Type["Config"]] = {}


def register_config(cls):
    """Class decorator: make a config dataclass known to `config_from_dict` under its class name."""
    _CONFIGS[cls.__name__] = cls
    return cls


class Config:
    """Base for config dataclasses: dict round trip and field checks."""

    def to_dict(self) -> dict:
        out = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            out[f.name] = _to_plain(getattr(self, f.name), f.name, type(self).__name__)
        return out


def _to_plain(v, name, owner):
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_to_plain(x, name, owner) for x in v]
    if isinstance(v, dict):
        return {str(k): _to_plain(x, name, owner) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if callable(v):
        raise ConfigError(f"{owner}.{name} is a Python callable ({v!r}); callables cannot be written to YAML/JSON. "
                          f"Use a built-in name instead, or keep this config in Python.")
    raise ConfigError(f"{owner}.{name} has a value of type {type(v).__name__} that cannot be serialized")


def config_from_dict(d: dict) -> "Config":
    """Build a config from a dict with a `type` key (as written by `Config.to_dict`).

    Unknown keys raise ConfigError naming the closest valid key."""
    if not isinstance(d, dict) or "type" not in d:
        raise ConfigError(f"expected a mapping with a 'type' key (one of {sorted(_CONFIGS)}), got {d!r}")
    name = d["type"]
    if name not in _CONFIGS:
        close = difflib.get_close_matches(str(name), list(_CONFIGS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config type '{name}'{hint} Known: {sorted(_CONFIGS)}")
    cls = _CONFIGS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        if k == "type":
            continue
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{k}' for {name}{hint} Valid keys: {sorted(fields)}")
        kwargs[k] = _from_plain(v, hints.get(k))
    return cls(**kwargs)


def _from_plain(v, hint):
    if isinstance(v, dict) and "type" in v and v["type"] in _CONFIGS:
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

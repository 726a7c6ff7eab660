"""The one verb: `pk.prune(model, config, ...)` dispatches on the config's type to its registered handler."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Dict, Optional

import torch.nn as nn

from prunekit.config import Config, get_handler
from prunekit.errors import ConfigError, InputTypeError
from prunekit.plan import Plan, attach_plan


@dataclasses.dataclass
class PruneResult:
    """What every pruning handler returns.

    model:  the pruned model (a new object unless `inplace=True` was asked).
    plan:   a `Plan` (prunekit.plan): what was cut, which `pk.load` replays on a fresh copy of the original.
    config: the config that produced it.
    stats:  numbers measured on the way (params/MACs before and after, per-group kept widths, ...).
    """
    model: nn.Module
    plan: Plan
    config: Optional[Config] = None
    stats: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        s = self.stats
        lines = [f"{type(self.config).__name__ if self.config else 'prune'} result"]
        for k in ("params", "macs"):
            if f"{k}_before" in s:
                b, a = s[f"{k}_before"], s[f"{k}_after"]
                lines.append(f"  {k:7s} {b:,} -> {a:,}  ({b / max(a, 1):.2f}x fewer)")
        lines += [f"  warning: {w}" for w in s.get("warnings", [])]
        if isinstance(s.get("verification"), dict):
            v = s["verification"]
            if v.get("mode") == "off":
                lines.append("  verification off (verify=False)")
            else:
                lines.append(f"  verified {v['mode']}: max relative difference {v['max_rel_diff']:.2e} from the "
                             f"dense model with the removed channels zeroed (tolerance {v['tolerance']:.1e})")
                approx = v.get("approximate_modules") or []
                if approx:
                    more = f" +{len(approx) - 4}" if len(approx) > 4 else ""
                    lines.append(f"  approximate only downstream of {len(approx)} normalization(s) over pruned "
                                 f"channels ({', '.join(approx[:4])}{more}; up to {v['max_approx_rel_diff']:.2e}), "
                                 f"everything else checked exactly")
        return "\n".join(lines)


def prune(model: nn.Module, config: Config, **context) -> PruneResult:
    """Prune `model` as `config` says.

    Context keywords depend on the method: `example_inputs=` (structured: traced to find coupled channels),
    `data=` (calibration batches for data-aware scores), `inplace=` (modify `model` itself; default False),
    `verify=False` (structured: skip the check against the dense model with the removed channels zeroed).
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"prune(model, ...): model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, Config):
        raise InputTypeError(f"prune(model, config): config must be a prunekit config object such as "
                             f"pk.Structured(ratio=0.5), got {type(config).__name__}")
    handler = get_handler(config)
    check_context(handler, config, context)
    result = handler(model, config, **context)
    attach_plan(result.model, result.plan)       # pk.save(result.model) after recovery keeps the plan
    return result


def check_context(handler, config: Config, context: Dict[str, Any]) -> None:
    """Every context keyword must be a keyword-only parameter of the config's handler; a misspelling is a
    ConfigError naming the closest valid keyword (handlers that declare **kwargs accept anything)."""
    params = inspect.signature(handler).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    for key in context:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"pk.prune(model, {type(config).__name__}(...), {key}=...): unknown keyword "
                              f"'{key}'; {hint}valid keywords: {valid}")

"""The one verb: `pk.prune(model, config, ...)` dispatches on the config's type to its registered handler."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch.nn as nn

from prunekit.config import Config, get_handler
from prunekit.errors import InputTypeError


@dataclasses.dataclass
class PruneResult:
    """What every pruning handler returns.

    model:  the pruned model (a new object unless `inplace=True` was asked).
    plan:   JSON-serializable description that `pk.load` replays on a fresh copy of the original architecture.
    config: the config that produced it.
    stats:  numbers measured on the way (params/MACs before and after, per-group kept widths, ...).
    """
    model: nn.Module
    plan: Dict[str, Any]
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
    return get_handler(config)(model, config, **context)

"""Pruning schedules: one-shot, iterative, gradual (cubic) sparsity, with recovery and a quality gate.

    sched = Iterative(prune=pk.Structured(ratio=0.5), steps=3, recover=pk.Recover(epochs=1, lr=1e-3),
                      max_drop=0.01)
    out = run_schedule(model, sched, example_inputs=x, train=train_batches, val=val_batches)
    out.model, out.status, out.history

A schedule expands to a flat list of `Step`s (prune k / recover k / gate k); `prunekit.run.executor` runs
them one at a time (and `run_schedule` there runs a whole schedule in memory).

* Iterative(steps=N) cuts the same *fraction of what is left* at every step, so after N steps exactly the
  requested ratio (or MACs/params/latency target) of the original is gone: per step 1 - (1 - r)^(1/N), and
  speedup^(1/N) for latency targets. steps=1 is one-shot.
* Gradual (Zhu & Gupta 2017): unstructured sparsity s_t = s_f + (s_i - s_f)(1 - t/N)^3 -- prune fast while
  there is redundancy, slowly near the end. Masks accumulate (a masked weight stays masked).
* Quality gate: after each step's recovery the model is evaluated on the validation data; if the metric
  dropped by more than `max_drop` from the dense model, the schedule stops and the last model that passed
  is kept (status "gate_failed").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional


from prunekit.config import Config, check_type, register_config
from prunekit.errors import ConfigError
from prunekit.recover.options import Recover
from prunekit.sparse.config import Sparse
from prunekit.structured.config import Latency, MACs, Params, Structured

GATE_METRICS = ("accuracy", "perplexity")


# --------------------------------------------------------------------------------------------- configs


@register_config(aliases=("Evaluate",))
@dataclasses.dataclass
class EvalStage(Config):
    """A schedule/recipe stage that evaluates the current model on the validation data (and optionally times it
    against the dense model); recipes write it as `evaluate: {...}` (or `type: Evaluate`, its older name).

    metric:     "accuracy" or "perplexity" (see prunekit.evaluate).
    max_drop:   quality gate: stop and keep the last good model if dense - current exceeds this (absolute,
                e.g. 0.01 = one accuracy point; for perplexity the allowed increase). None = no gate.
    latency:    also measure latency (interleaved with the dense model) at `batch_size`, `threads`.
    max_batches: evaluate on at most this many validation batches.
    min_slice_size: when the validation batches carry slice tags (e.g. pk.data.load("lm-slices")), every
                evaluation compares each slice with the dense model (bootstrap CIs, flags) and the run's report
                shows it; slices with fewer examples are shown but not judged.
    """
    metric: str = "accuracy"
    max_drop: Optional[float] = None
    latency: bool = False
    batch_size: int = 16
    threads: int = 1
    max_batches: Optional[int] = None
    min_slice_size: int = 20

    def __post_init__(self):
        if self.metric not in GATE_METRICS:
            raise ConfigError(f"EvalStage.metric must be one of {GATE_METRICS}, got {self.metric!r}")
        if self.max_drop is not None:
            check_type("EvalStage", "max_drop", self.max_drop, (int, float), "a number >= 0 or None")
            if self.max_drop < 0:
                raise ConfigError(f"EvalStage.max_drop must be >= 0, got {self.max_drop}")
        check_type("EvalStage", "latency", self.latency, bool, "true or false")
        for n in ("batch_size", "threads", "min_slice_size"):
            check_type("EvalStage", n, getattr(self, n), int, "a positive int")


def _check_schedule(owner: str, steps, recover, max_drop):
    check_type(owner, "steps", steps, int, "a positive int")
    if steps < 1:
        raise ConfigError(f"{owner}.steps must be >= 1, got {steps}")
    if recover is not None and not isinstance(recover, Recover):
        raise ConfigError(f"{owner}.recover must be a Recover config (e.g. {{type: Recover, epochs: 1}}), "
                          f"got {recover!r}")
    if max_drop is not None:
        check_type(owner, "max_drop", max_drop, (int, float), "a number >= 0 or None")


@register_config
@dataclasses.dataclass
class Iterative(Config):
    """Reach `prune`'s amount in `steps` equal geometric steps, recovering (and gating) after each.

    prune: a Structured or Sparse config (its ratio/target/sparsity is the *final* amount).
    steps: 1 = one-shot. recover: Recover config run after every step (None: no recovery).
    max_drop / metric: the quality gate, checked after each step (None: no gate)."""
    prune: Optional[Config] = None
    steps: int = 3
    recover: Optional[Recover] = None
    max_drop: Optional[float] = None
    metric: str = "accuracy"

    def __post_init__(self):
        if not isinstance(self.prune, (Structured, Sparse)):
            raise ConfigError(f"{type(self).__name__}.prune must be a Structured or Sparse config, got {self.prune!r}")
        _check_schedule(type(self).__name__, self.steps, self.recover, self.max_drop)
        if self.metric not in GATE_METRICS:
            raise ConfigError(f"{type(self).__name__}.metric must be one of {GATE_METRICS}, got {self.metric!r}")


@register_config
@dataclasses.dataclass
class OneShot(Iterative):
    """Prune once to `prune`'s amount, then recover and gate: an Iterative schedule fixed to one step
    (`steps` is not a field of its YAML form)."""
    steps: int = dataclasses.field(default=1, init=False, repr=False)


@register_config
@dataclasses.dataclass
class Gradual(Config):
    """Gradual magnitude pruning with the cubic sparsity schedule of Zhu & Gupta (2017), unstructured masks.

    sparsity / initial_sparsity: final and first sparsity. steps: pruning steps (recovery after each).
    prune: optional Sparse config template (method, targets, ignore, pattern); its sparsity is replaced."""
    sparsity: float = 0.5
    initial_sparsity: float = 0.0
    steps: int = 4
    prune: Optional[Config] = None
    recover: Optional[Recover] = None
    max_drop: Optional[float] = None
    metric: str = "accuracy"

    def __post_init__(self):
        for n in ("sparsity", "initial_sparsity"):
            v = getattr(self, n)
            check_type("Gradual", n, v, (int, float), "a number in [0, 1)")
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"Gradual.{n} must be in [0, 1), got {v!r}")
        if self.initial_sparsity > self.sparsity:
            raise ConfigError(f"Gradual.initial_sparsity ({self.initial_sparsity}) must not exceed sparsity "
                              f"({self.sparsity})")
        if self.prune is not None and not isinstance(self.prune, Sparse):
            raise ConfigError(f"Gradual.prune must be a Sparse config template, got {self.prune!r}")
        _check_schedule("Gradual", self.steps, self.recover, self.max_drop)
        if self.metric not in GATE_METRICS:
            raise ConfigError(f"Gradual.metric must be one of {GATE_METRICS}, got {self.metric!r}")


# --------------------------------------------------------------------------------------------- pure schedule math


def cubic_sparsity(t: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta: sparsity after step t of `steps` (t = 1..steps); equals `final` at t = steps."""
    if not 0 <= t <= steps:
        raise ConfigError(f"cubic_sparsity: step {t} outside 0..{steps}")
    return final + (initial - final) * (1.0 - t / steps) ** 3


def per_step_ratio(ratio: float, steps: int) -> float:
    """Fraction of the *current* units to cut at each of `steps` steps so that `ratio` of the original go."""
    return 1.0 - (1.0 - ratio) ** (1.0 / steps)


def cumulative_ratio(ratio: float, steps: int, k: int) -> float:
    """Fraction of the original gone after k of `steps` equal geometric steps (absolute, for masks)."""
    return 1.0 - (1.0 - ratio) ** (k / steps)


def step_config(cfg: Config, steps: int, k: int) -> Config:
    """The config that step k (1-based) of an iterative schedule applies to the model left by step k-1."""
    if steps == 1:
        return cfg
    if isinstance(cfg, Sparse):
        return dataclasses.replace(cfg, sparsity=cumulative_ratio(cfg.sparsity, steps, k))
    if not isinstance(cfg, Structured):
        raise ConfigError(f"cannot schedule a {type(cfg).__name__} config; use Structured or Sparse")
    t = cfg.target
    if isinstance(t, (MACs, Params)):
        return dataclasses.replace(cfg, target=dataclasses.replace(t, ratio=per_step_ratio(t.ratio, steps)))
    if isinstance(t, Latency):
        return dataclasses.replace(cfg, target=dataclasses.replace(t, speedup=t.speedup ** (1.0 / steps)))
    if isinstance(cfg.ratio, dict):
        return dataclasses.replace(cfg, ratio={k_: per_step_ratio(v, steps) for k_, v in cfg.ratio.items()})
    return dataclasses.replace(cfg, ratio=per_step_ratio(cfg.ratio, steps))


def quality_drop(dense: float, current: float, metric: str) -> float:
    """How much worse `current` is than `dense` (positive = worse): accuracy falls, perplexity rises."""
    return current - dense if metric == "perplexity" else dense - current


# --------------------------------------------------------------------------------------------- steps


@dataclasses.dataclass
class Step:
    """One atomic unit of work: kind in ("prune", "recover", "evaluate"); `label` names it in logs."""
    kind: str
    config: Config
    label: str
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)


def expand(stage: Config, label: str = "", options: Optional[Dict[str, Any]] = None) -> List[Step]:
    """A stage (a prune config, Recover, EvalStage, Iterative/OneShot, Gradual) as a flat list of steps."""
    options = options or {}
    if isinstance(stage, (Structured, Sparse)):
        return [Step("prune", stage, label or "prune", dict(options))]
    if isinstance(stage, Recover):
        return [Step("recover", stage, label or "recover")]
    if isinstance(stage, EvalStage):
        return [Step("evaluate", stage, label or "evaluate")]
    if isinstance(stage, (Iterative, Gradual)):
        out = []
        for k in range(1, stage.steps + 1):
            if isinstance(stage, Iterative):
                cfg = step_config(stage.prune, stage.steps, k)
            else:
                tmpl = stage.prune or Sparse()
                cfg = dataclasses.replace(tmpl, sparsity=cubic_sparsity(k, stage.steps, stage.sparsity,
                                                                        stage.initial_sparsity))
            tag = f"{label or type(stage).__name__.lower()} {k}/{stage.steps}"
            out.append(Step("prune", cfg, f"{tag} prune", dict(options)))
            if stage.recover is not None:
                out.append(Step("recover", stage.recover, f"{tag} recover"))
            if stage.max_drop is not None:
                out.append(Step("evaluate", EvalStage(metric=stage.metric, max_drop=stage.max_drop), f"{tag} gate"))
        return out
    raise ConfigError(f"a stage must be a Structured/Sparse/Recover/EvalStage/Iterative/OneShot/Gradual config, got "
                      f"{type(stage).__name__}")

"""Pruning schedules: one-shot, iterative, gradual (cubic) sparsity, with recovery and a quality gate.

    sched = Iterative(prune=pk.Structured(ratio=0.5), steps=3, recover=pk.Recover(epochs=1, lr=1e-3),
                      max_drop=0.01)
    out = run_schedule(model, sched, example_inputs=x, train=train_batches, val=val_batches)
    out.model, out.status, out.history

A schedule expands to a flat list of `Step`s (prune k / recover k / gate k). `Executor` runs one step at a
time on its state (current model, cumulative structured plan, masked layers, last good model), which is
what lets `prunekit.pipeline` checkpoint after every step and resume in the middle of a schedule.

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

import copy
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn

from prunekit.api import prune
from prunekit.batch import split_batch
from prunekit.config import Config, check_type, register_config
from prunekit.errors import CalibrationDataError, ConfigError
from prunekit.evaluate.core import evaluate
from prunekit.graph.groups import DependencyGraph
from prunekit.io.state import load_state, replay
from prunekit.measure.latency import measure_latency
from prunekit.recover.loop import recover
from prunekit.recover.options import Recover
from prunekit.sparse.masks import SparseMask
from prunekit.sparse.prune import Sparse
from prunekit.sparse.prune import Sparse as _Sparse
from prunekit.structured import importance as I
from prunekit.structured.handler import is_causal_lm, resolve_auto_importance
from prunekit.structured.config import MACs, Params, Structured
from prunekit.structured.sensitivity import sensitivity_ratios

GATE_METRICS = ("accuracy", "perplexity")


# --------------------------------------------------------------------------------------------- configs


@register_config
@dataclasses.dataclass
class Evaluate(Config):
    """Evaluate the current model on the validation data (and optionally time it against the dense model).

    metric:     "accuracy" or "perplexity" (see prunekit.evaluate).
    max_drop:   quality gate: stop and keep the last good model if dense - current exceeds this (absolute,
                e.g. 0.01 = one accuracy point; for perplexity the allowed increase). None = no gate.
    latency:    also measure latency (interleaved with the dense model) at `batch_size`, `threads`.
    max_batches: evaluate on at most this many validation batches.
    """
    metric: str = "accuracy"
    max_drop: Optional[float] = None
    latency: bool = False
    batch_size: int = 16
    threads: int = 1
    max_batches: Optional[int] = None

    def __post_init__(self):
        if self.metric not in GATE_METRICS:
            raise ConfigError(f"Evaluate.metric must be one of {GATE_METRICS}, got {self.metric!r}")
        if self.max_drop is not None:
            check_type("Evaluate", "max_drop", self.max_drop, (int, float), "a number >= 0 or None")
            if self.max_drop < 0:
                raise ConfigError(f"Evaluate.max_drop must be >= 0, got {self.max_drop}")
        check_type("Evaluate", "latency", self.latency, bool, "true or false")
        for n in ("batch_size", "threads"):
            check_type("Evaluate", n, getattr(self, n), int, "a positive int")


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
            raise ConfigError(f"Iterative.prune must be a Structured or Sparse config, got {self.prune!r}")
        _check_schedule("Iterative", self.steps, self.recover, self.max_drop)
        if self.metric not in GATE_METRICS:
            raise ConfigError(f"Iterative.metric must be one of {GATE_METRICS}, got {self.metric!r}")


def OneShot(prune: Config, recover: Optional[Recover] = None, max_drop: Optional[float] = None,
            metric: str = "accuracy") -> Iterative:
    """One-shot pruning = an iterative schedule with one step."""
    return Iterative(prune=prune, steps=1, recover=recover, max_drop=max_drop, metric=metric)


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
    if t is not None and hasattr(t, "speedup"):
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
    """A stage (a prune config, Recover, Evaluate, Iterative, Gradual) as a flat list of steps."""
    options = options or {}
    if isinstance(stage, (Structured, Sparse)):
        return [Step("prune", stage, label or "prune", dict(options))]
    if isinstance(stage, Recover):
        return [Step("recover", stage, label or "recover")]
    if isinstance(stage, Evaluate):
        return [Step("evaluate", stage, label or "evaluate")]
    if isinstance(stage, (Iterative, Gradual)):
        out = []
        for k in range(1, stage.steps + 1):
            if isinstance(stage, Iterative):
                cfg = step_config(stage.prune, stage.steps, k)
            else:
                tmpl = stage.prune or _Sparse()
                cfg = dataclasses.replace(tmpl, sparsity=cubic_sparsity(k, stage.steps, stage.sparsity,
                                                                        stage.initial_sparsity))
            tag = f"{label or type(stage).__name__.lower()} {k}/{stage.steps}"
            out.append(Step("prune", cfg, f"{tag} prune", dict(options)))
            if stage.recover is not None:
                out.append(Step("recover", stage.recover, f"{tag} recover"))
            if stage.max_drop is not None:
                out.append(Step("evaluate", Evaluate(metric=stage.metric, max_drop=stage.max_drop), f"{tag} gate"))
        return out
    raise ConfigError(f"a stage must be a Structured/Sparse/Recover/Evaluate/Iterative/Gradual config, got "
                      f"{type(stage).__name__}")


# --------------------------------------------------------------------------------------------- plans


def compose_plans(first: Optional[Dict[str, Any]], second: Dict[str, Any]) -> Dict[str, Any]:
    """One structured plan equal to applying `first` then `second` to the original architecture.

    `second`'s kept indices are positions in the tensors `first` left; they are mapped back through
    `first` so `prunekit.io.replay` can rebuild the final shapes from a fresh original model."""
    if not first:
        return {"format": "prunekit.structured/1", "kept": dict(second.get("kept", {})),
                "attrs": [list(a) for a in second.get("attrs", [])], "steps": [second.get("config")]}
    kept = {n: dict(d) for n, d in first.get("kept", {}).items()}
    for name, dims in second.get("kept", {}).items():
        for dim, idx in dims.items():
            prev = kept.get(name, {}).get(str(dim))
            kept.setdefault(name, {})[str(dim)] = [prev[i] for i in idx] if prev is not None else list(idx)
    attrs = {(a[0], a[1]): a[2] for a in first.get("attrs", [])}
    attrs.update({(a[0], a[1]): a[2] for a in second.get("attrs", [])})
    return {"format": "prunekit.structured/1", "kept": kept, "attrs": [[m, a, v] for (m, a), v in attrs.items()],
            "steps": list(first.get("steps", [])) + [second.get("config")]}


class GateFailed(Exception):
    """Raised inside the executor when a quality gate fails (handled by callers: keep the last good model)."""


class Executor:
    """Runs steps on a model, keeping the cumulative plan, masked layers and the last model that passed.

    original:  the dense model (teacher for distillation and reference for gates); never modified.
    train/val: batches for calibration + recovery and for evaluation; example_inputs for tracing.
    recover_dir: callable(step index) -> checkpoint_dir for recover() (None: no recovery checkpoints)."""

    def __init__(self, original: nn.Module, *, example_inputs, train=None, val=None, loss_fn=None,
                 calibration_batches: int = 8, quiet: bool = True,
                 recover_dir: Optional[Callable[[int], Optional[str]]] = None, log: Callable[[str], None] = print,
                 distill: bool = True):
        self.original = original.eval()
        self.example_inputs, self.train, self.val = example_inputs, train, val
        self.loss_fn, self.calibration_batches, self.quiet = loss_fn, calibration_batches, quiet
        self.recover_dir, self.log, self.distill = recover_dir, log, distill
        self.model = copy.deepcopy(original)
        self.plan: Optional[Dict[str, Any]] = None
        self.masked: List[str] = []
        self.dense_metric: Dict[str, float] = {}
        self.last_good: Optional[nn.Module] = None
        self.last_good_step = -1
        self.history: List[Dict[str, Any]] = []

    # ---- state (what a checkpoint must hold besides the weights)
    def state(self) -> Dict[str, Any]:
        return {"plan": self.plan, "masked": list(self.masked), "dense_metric": dict(self.dense_metric),
                "last_good_step": self.last_good_step, "history": list(self.history)}

    def load_state(self, st: Dict[str, Any], weights: Dict[str, torch.Tensor]) -> None:
        """Rebuild the model from the original + plan + masks, then load `weights` (a checkpoint)."""
        self.plan, self.masked = st["plan"], list(st["masked"])
        self.dense_metric, self.last_good_step = dict(st["dense_metric"]), st["last_good_step"]
        self.history = list(st["history"])
        self.model = rebuild(self.original, self.plan, self.masked)
        load_state(self.model, dict(weights), strict=True, where="checkpoint")

    # ---- steps
    def run(self, i: int, step: Step) -> Dict[str, Any]:
        """Run step `i`; returns the numbers it produced. Raises GateFailed (model restored to last good)."""
        fn = {"prune": self._prune, "recover": self._recover, "evaluate": self._evaluate}[step.kind]
        values = fn(i, step)
        self.history.append({"index": i, "label": step.label, "kind": step.kind, **values})
        return values

    def _prune(self, i: int, step: Step) -> Dict[str, Any]:
        cfg = step.config
        if isinstance(cfg, Sparse):
            data = [split_batch(b)[0] for b in self._calibration()] if cfg.needs_data else None
            res = prune(self.model, cfg, data=data)
            self.model = res.model
            self.masked = sorted(set(self.masked) | set(res.plan["layers"]))
            return {"sparsity": float(res.stats["sparsity_total"])}
        if self.masked:
            raise ConfigError(f"step '{step.label}': structured pruning after unstructured (Sparse) masks is not "
                              f"supported; put Sparse/Gradual stages after the structured ones")
        cfg = self._prepare_structured(cfg, step)
        res = prune(self.model, cfg, example_inputs=self.example_inputs, graph=self._graph)
        self.model = res.model
        self.plan = compose_plans(self.plan, res.plan)
        out = {k: res.stats[k] for k in ("params_before", "params_after", "macs_before", "macs_after")}
        out.update({k: v for k, v in res.stats.items() if k.startswith("latency_") and not isinstance(v, (dict, list))})
        return out

    def _prepare_structured(self, cfg, step: Step):
        """Trace once, run data-aware importance calibration, apply sensitivity allocation if asked."""
        self.model.eval()
        if cfg.importance == "auto" and is_causal_lm(self.model):      # LLMs: Taylor on the LM loss, not magnitude
            calib = [split_batch(b)[0] for b in self._calibration()] if self.train is not None else None
            cfg, _ = resolve_auto_importance(self.model, cfg, calib)
        self._graph = DependencyGraph(self.model, self.example_inputs, ignore=cfg.ignore)
        imp = I.resolve(cfg.importance)
        needs = isinstance(imp, I.Importance) and imp.needs_data
        imp = I.prepare(imp, self.model, self._graph, self._calibration() if needs else None, self.loss_fn)
        cfg = dataclasses.replace(cfg, importance=imp)
        if step.options.get("allocation", "ratio") == "sensitivity":
            if isinstance(cfg.ratio, dict) or cfg.target is not None:
                raise ConfigError(f"step '{step.label}': allocation: sensitivity needs a single float ratio and "
                                  f"no target")
            ratios = sensitivity_ratios(self.model, self.example_inputs, self._calibration(), cfg.ratio, imp,
                                        cfg.max_ratio_per_layer, self.loss_fn, quiet=self.quiet)
            cfg = dataclasses.replace(cfg, ratio=ratios)
        return cfg

    def _calibration(self):
        if self.train is None:
            raise CalibrationDataError("this step needs calibration data: pass train= batches")
        return [b for _, b in zip(range(self.calibration_batches), self.train)]

    def _recover(self, i: int, step: Step) -> Dict[str, Any]:
        if self.train is None:
            raise CalibrationDataError(f"step '{step.label}' (recover) needs training data: pass train= batches")
        teacher = self.original if self.distill else None
        ckpt = self.recover_dir(i) if self.recover_dir else None
        res = recover(self.model, teacher=teacher, data=self.train, config=step.config, checkpoint_dir=ckpt,
                      quiet=self.quiet, task_loss_fn=self.loss_fn, return_result=True)
        self.model = res.model
        return {"loss": res.history[-1]["loss"] if res.history else None, "steps": res.steps}

    def metric(self, model: nn.Module, cfg: Evaluate) -> float:
        if self.val is None:
            raise CalibrationDataError("evaluation needs validation data: pass val= batches")
        return float(evaluate(model, self.val, cfg.metric, max_batches=cfg.max_batches).value)

    def _evaluate(self, i: int, step: Step) -> Dict[str, Any]:
        cfg: Evaluate = step.config
        key = f"{cfg.metric}:{cfg.max_batches}"
        if key not in self.dense_metric:
            self.dense_metric[key] = self.metric(self.original, cfg)
        dense, value = self.dense_metric[key], self.metric(self.model, cfg)
        out = {"metric": cfg.metric, "dense": dense, "value": value,
               "drop": quality_drop(dense, value, cfg.metric),
               "params": sum(p.numel() for p in self.model.parameters())}
        if cfg.latency:
            lat = measure_latency({"dense": self.original, "pruned": self.model}, self.example_inputs,
                                  batch_sizes=(cfg.batch_size,), threads=cfg.threads)
            out.update(dense_ms=lat.get_row("dense", cfg.batch_size)["median_ms"],
                       latency_ms=lat.get_row("pruned", cfg.batch_size)["median_ms"],
                       speedup=lat.speedup("dense", "pruned", cfg.batch_size))
        if cfg.max_drop is not None and out["drop"] > cfg.max_drop:
            out["gate"] = "failed"
            raise GateFailed(f"step '{step.label}': {cfg.metric} {value:.4f} vs dense {dense:.4f} (drop "
                             f"{out['drop']:.4f} > max_drop {cfg.max_drop}); keeping the last good model "
                             f"(after step {self.last_good_step})", out)
        if cfg.max_drop is not None:
            out["gate"] = "passed"
            self.mark_good(i)
        return out

    def mark_good(self, i: int) -> None:
        """Remember the current model (and its plan and masks) as the one to fall back to."""
        self.last_good = (copy.deepcopy(self.model), copy.deepcopy(self.plan), list(self.masked))
        self.last_good_step = i

    def restore_last_good(self) -> None:
        model, plan, masked = self.last_good
        self.model, self.plan, self.masked = copy.deepcopy(model), copy.deepcopy(plan), list(masked)


def rebuild(original: nn.Module, plan: Optional[Dict[str, Any]], masked: List[str]) -> nn.Module:
    """A copy of `original` with the plan's shapes and empty (all-keep) masks on `masked` layers, ready to
    receive a checkpoint's weights."""
    from torch.nn.utils import parametrize
    model = copy.deepcopy(original)
    if plan:
        replay(model, plan)
    mods = dict(model.named_modules())
    for name in masked:
        w = mods[name].weight
        parametrize.register_parametrization(mods[name], "weight", SparseMask(torch.ones_like(w, dtype=torch.bool)))
    return model


@dataclasses.dataclass
class ScheduleResult:
    """model: the final model (the last good one if a gate failed); plan: cumulative structured plan;
    status: "completed" | "gate_failed"; history: one dict per step; message: why it stopped."""
    model: nn.Module
    plan: Optional[Dict[str, Any]]
    status: str
    history: List[Dict[str, Any]]
    message: str = ""


def run_schedule(model: nn.Module, schedule: Union[Config, List[Config]], *, example_inputs, train=None, val=None,
                 loss_fn=None, quiet: bool = True, distill: bool = True, allocation: str = "ratio"
                 ) -> ScheduleResult:
    """Run a schedule (or a list of stages) in memory; `model` is not modified.

    The dense model is the teacher of every recovery (distill=False: task loss on the labels instead)."""
    stages = schedule if isinstance(schedule, list) else [schedule]
    steps = [s for st in stages for s in expand(st, options={"allocation": allocation})]
    ex = Executor(model, example_inputs=example_inputs, train=train, val=val, loss_fn=loss_fn, quiet=quiet,
                  distill=distill, log=(lambda m: None) if quiet else print)
    ex.mark_good(-1)
    for i, step in enumerate(steps):
        try:
            ex.run(i, step)
        except GateFailed as e:
            ex.history.append({"index": i, "label": step.label, "kind": "evaluate", **e.args[1]})
            ex.restore_last_good()
            return ScheduleResult(ex.model, ex.plan, "gate_failed", ex.history, e.args[0])
    return ScheduleResult(ex.model, ex.plan, "completed", ex.history)

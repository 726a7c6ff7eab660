"""Run a schedule one step at a time: `Executor` holds the current model, the cumulative structured plan,
the masked layers and the last model that passed a quality gate, which is what lets `prunekit.run.pipeline`
checkpoint after every step and resume in the middle of a schedule. `run_schedule` runs one in memory.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from prunekit.api import prune
from prunekit.batch import split_batch
from prunekit.config import Config
from prunekit.errors import CalibrationDataError, ConfigError
from prunekit.evaluate.compare import compare_slices
from prunekit.evaluate.core import evaluate
from prunekit.evaluate.result import EvalResult
from prunekit.graph.groups import DependencyGraph
from prunekit.io.state import load_state, replay
from prunekit.measure.counts import count_params
from prunekit.measure.latency import measure_latency
from prunekit.plan import Plan, compose_plans
from prunekit.recover.loop import recover
from prunekit.run.schedule import EvalStage, Step, expand, quality_drop
from prunekit.sparse.masks import SparseMask
from prunekit.sparse.config import Sparse
from prunekit.structured import importance as I
from prunekit.structured.handler import is_causal_lm, resolve_auto_importance
from prunekit.structured.sensitivity import sensitivity_ratios


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
        self.plan: Optional[Plan] = None
        self.masked: List[str] = []
        self.dense_metric: Dict[str, float] = {}
        self.dense_eval: Dict[str, EvalResult] = {}
        self.last_good: Optional[nn.Module] = None
        self.last_good_step = -1
        self.history: List[Dict[str, Any]] = []

    # ---- state (what a checkpoint must hold besides the weights)
    def state(self) -> Dict[str, Any]:
        return {"plan": self.plan.to_dict() if self.plan else None, "masked": list(self.masked), "dense_metric": dict(self.dense_metric),
                "last_good_step": self.last_good_step, "history": list(self.history)}

    def load_state(self, st: Dict[str, Any], weights: Dict[str, torch.Tensor]) -> None:
        """Rebuild the model from the original + plan + masks, then load `weights` (a checkpoint)."""
        self.plan = Plan.from_dict(st["plan"], where="checkpoint state") if st["plan"] else None
        self.masked = list(st["masked"])
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
            self.masked = sorted(set(self.masked) | set(res.plan.layers))
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

    def metric(self, model: nn.Module, cfg: EvalStage) -> EvalResult:
        if self.val is None:
            raise CalibrationDataError("evaluation needs validation data: pass val= batches")
        return evaluate(model, self.val, cfg.metric, max_batches=cfg.max_batches)

    def _evaluate(self, i: int, step: Step) -> Dict[str, Any]:
        cfg: EvalStage = step.config
        key = f"{cfg.metric}:{cfg.max_batches}"
        if key not in self.dense_eval:                    # in memory only: a resumed run evaluates dense again
            self.dense_eval[key] = self.metric(self.original, cfg)
        self.dense_metric.setdefault(key, float(self.dense_eval[key].value))
        res = self.metric(self.model, cfg)
        dense, value = self.dense_metric[key], float(res.value)
        out = {"metric": cfg.metric, "dense": dense, "value": value,
               "drop": quality_drop(dense, value, cfg.metric),
               "params": count_params(self.model)}
        if len(res.slices) > 1:                           # tagged validation data: per-slice drops vs dense
            cmp = compare_slices(self.dense_eval[key], res, min_slice_size=cfg.min_slice_size)
            out.update(slices=cmp.to_dict(), flagged=[str(s) for s in cmp.flagged])
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


def rebuild(original: nn.Module, plan: Optional[Plan], masked: List[str]) -> nn.Module:
    """A copy of `original` with the plan's shapes and empty (all-keep) masks on `masked` layers, ready to
    receive a checkpoint's weights."""
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
    plan: Optional[Plan]
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

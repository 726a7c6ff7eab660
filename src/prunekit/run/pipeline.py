"""Recipes: a pruning job as data (YAML/JSON), run into a resumable run directory.

A recipe is a list of stages, each mapping to the same config dataclass the Python API uses::

    seed: 0
    batch_size: 64            # training / calibration batches
    train_limit: 4096         # examples of the train split used (calibration + recovery); null = all
    val_limit: 2000           # examples of the test split used for evaluation
    calibration_batches: 8
    distill: true             # recover towards the dense model (false: task loss on labels)
    stages:
      - evaluate: {metric: accuracy}
      - prune: {type: Structured, ratio: 0.3, importance: {type: Taylor}}
        allocation: sensitivity           # optional: "ratio" (default) or "sensitivity"
      - recover: {epochs: 1, lr: 0.001}
      - schedule: {type: Iterative, steps: 2, prune: {type: Structured, ratio: 0.5}, max_drop: 0.02}
      - evaluate: {metric: accuracy, latency: true}

`run_pipeline(model, recipe, train=..., val=..., out="runs/x")` expands the stages into steps and writes::

    runs/x/config.json, config.yaml   the resolved recipe (a resume insists it is unchanged)
    runs/x/run.log                    one line per step
    runs/x/metrics.json               run / summary / steps / widths / env (prunekit.report format)
    runs/x/checkpoints/step-*/        after every step: weights + state.json (cumulative plan, masks, history)
    runs/x/recover-NNN/               recover()'s own checkpoints for step NNN (mid-epoch resume)
    runs/x/last_good/                 pk.save of the last model that passed a quality gate
    runs/x/model/                     pk.save of the final model: pk.load(dir, model=fresh_original)
    runs/x/COMPLETE                   written last

`resume=True` rebuilds the model from the latest checkpoint (original architecture + plan + weights) and
continues; every step is seeded with (seed, step index), and recover() resumes mid-run bit-exactly, so the
final weights equal an uninterrupted run's.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn

from prunekit.api import PruneResult
from prunekit.batch import progress, split_batch
from prunekit.errors import RecoveryDiverged, RunError
from prunekit.io.format import load, save
from prunekit.measure.counts import count_params
from prunekit.plan import Plan
from prunekit.report.recorder import RunRecorder
from prunekit.run.directory import Run, fingerprint, seed_everything
from prunekit.run.executor import Executor, GateFailed
from prunekit.run.export import check_exports, run_exports
from prunekit.run.recipe import Recipe, load_recipe, read_recipe_file  # noqa: F401  (the public names)
from prunekit.run.schedule import Step
from prunekit.sparse.masks import bake, masks, remask_from_zeros

# --------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class PipelineResult:
    """model: final model; status: completed | gate_failed | diverged; run_dir; history; message."""
    model: nn.Module
    status: str
    run_dir: Path
    history: List[Dict[str, Any]]
    message: str = ""
    plan: Optional[Plan] = None


def _save_model(model: nn.Module, plan, path: Path) -> None:
    """pk.save of a model (masks baked in a copy, so pk.load into the original architecture works)."""
    if masks(model):
        model = copy.deepcopy(model)
        bake(model)
    save(PruneResult(model=model, plan=plan or Plan()), path)


def _widths(original: nn.Module, model: nn.Module) -> List[Dict[str, Any]]:
    """Per layer: original vs kept output width (conv out_channels / linear out_features), with the unit kind."""
    cur = dict(model.named_modules())
    rows = []
    for name, m in original.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and name in cur and isinstance(w, torch.Tensor):
            rows.append({"name": name, "kind": "features" if isinstance(m, nn.Linear) else "channels",
                         "original": int(w.shape[0]), "kept": int(cur[name].weight.shape[0])})
    return rows


def run_pipeline(model: nn.Module, recipe: Union[Recipe, str, Path, dict], *, train, val, out: Union[str, Path],
                 example_inputs=None, resume: bool = False, quiet: bool = False, loss_fn: Optional[Callable] = None,
                 describe: Optional[Dict[str, Any]] = None, stop_after: Optional[int] = None) -> PipelineResult:
    """Run `recipe` on the dense `model` (not modified) into run directory `out`.

    train / val: batches ((inputs, targets) or inputs) for calibration + recovery and for evaluation.
    example_inputs: for tracing (default: one row of the first training batch).
    resume: continue the run in `out` from its latest checkpoint (same recipe and data required).
    describe: free-form {"model": ..., "data": ...} stored in config.json and the report.
    stop_after: stop (as if killed) after this many steps; used to test resume."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise RunError(f"run directory '{out}' already exists and is not empty; pass resume=True (--resume) to "
                       f"continue it, or choose a new --out")
    if resume and not (out / "config.json").exists():
        raise RunError(f"cannot resume: '{out}' has no config.json (not a run directory, or it never started)")
    if example_inputs is None:
        x = split_batch(train[0])[0]
        example_inputs = x[:1] if isinstance(x, torch.Tensor) else x
    steps = recipe.steps()
    check_exports(recipe.exports(), out, describe)
    run = Run(out)
    with run.locked():
        run.check_or_write_config({"recipe": recipe.to_dict(), "describe": describe or {},
                                   "fingerprint": {"model": fingerprint(model.state_dict()),
                                                   "data": fingerprint({"train": train, "val": val})}})
        return _execute(run, model, recipe, steps, train=train, val=val, example_inputs=example_inputs,
                        resume=resume, quiet=quiet, loss_fn=loss_fn, describe=describe, stop_after=stop_after)


def _execute(run: Run, model: nn.Module, recipe: Recipe, steps: List[Step], *, train, val, example_inputs,
             resume: bool, quiet: bool, loss_fn, describe, stop_after) -> PipelineResult:
    """The body of run_pipeline, run while holding the run directory's lock."""
    out = run.path
    original = copy.deepcopy(model).eval()
    ex = Executor(original, example_inputs=example_inputs, train=train, val=val, loss_fn=loss_fn,
                  calibration_batches=recipe.calibration_batches, quiet=quiet, distill=recipe.distill,
                  recover_dir=lambda i: str(out / f"recover-{i:03d}"), log=run.log)
    start = _restore(run, ex, out, len(steps)) if resume else None
    if start is None:
        start = 0
        ex.mark_good(-1)
        run.log(f"start: {len(steps)} steps")
    rec = RunRecorder(out, run={"name": out.name, **(describe or {}), "steps": [s.label for s in steps]})
    _record(rec, ex, original, recipe)
    status, message = "completed", ""
    bar = progress(desc="pipeline", quiet=quiet, total=len(steps), initial=start, leave=True)
    try:
        for i in range(start, len(steps)):
            if stop_after is not None and i >= stop_after:
                return PipelineResult(ex.model, "interrupted", out, ex.history, f"stopped before step {i}", ex.plan)
            step = steps[i]
            bar.set_description(step.label)
            seed_everything(recipe.seed * 1_000_003 + i)
            t0 = time.perf_counter()
            try:
                values = ex.run(i, step)
            except GateFailed as e:
                ex.history.append({"index": i, "label": step.label, "kind": "evaluate", **e.args[1]})
                ex.restore_last_good()
                status, message = "gate_failed", e.args[0]
                run.log(message)
                break
            except RecoveryDiverged as e:
                status = "diverged"
                message = (f"{e} The pipeline stopped; the last good checkpoint "
                           f"({run.latest_checkpoint() or 'the dense model'}) is kept unchanged.")
                run.log(message)
                ex.history.append({"index": i, "label": step.label, "kind": "recover", "status": "diverged"})
                ex.model = rebuild_from_checkpoint(run, ex) if run.latest_checkpoint() else copy.deepcopy(original)
                break
            run.log(f"step {i + 1}/{len(steps)} {step.label}: " + _fmt(values) + f" ({time.perf_counter() - t0:.1f}s)")
            if step.kind == "evaluate" and values.get("gate") == "passed":
                _save_model(ex.model, ex.plan, out / "last_good")
            _checkpoint(run, ex, i + 1)
            _record(rec, ex, original, recipe)
            bar.update(1)
    finally:
        bar.close()
    _save_model(ex.model, ex.plan, out / "model")
    if status == "completed" and recipe.exports():
        _export(run, rec, recipe, original, val=val, example_inputs=example_inputs, describe=describe)
    rec.data["final"] = {"status": status, "message": message, "steps_done": len(ex.history)}   # written by _record
    _record(rec, ex, original, recipe)
    if status == "completed":
        rec.finish()
    run.log(f"{status} {message}".rstrip())
    return PipelineResult(ex.model, status, out, ex.history, message, ex.plan)


def _export(run: Run, rec: RunRecorder, recipe: Recipe, original: nn.Module, **kw) -> None:
    """The recipe's export stages on the saved final model (what pk.load gives back) and the dense one."""
    models = {"dense": original, "pruned": load(run.path / "model", model=copy.deepcopy(original)).eval()}
    res = run_exports(recipe.exports(), models, run.path, log=run.log, **kw)
    if res["llamacpp"]:
        rec.set("llamacpp", res["llamacpp"])
    for note in res["notes"]:
        rec.add_note(note)


def _restore(run: Run, ex: Executor, out: Path, n_steps: int) -> Optional[int]:
    """Load the latest checkpoint into `ex` (and its last good model); the index of the next step, or None
    when the run has no checkpoint yet."""
    loaded = run.load_checkpoint()
    if loaded is None:
        return None
    weights, st = loaded
    ex.load_state(st["executor"], weights)
    if (out / "last_good").is_dir():
        good_masked = list(st.get("last_good_masked") or [])
        good = load(out / "last_good", model=copy.deepcopy(ex.original))     # saved baked: masks come back
        remask_from_zeros(good, good_masked)                                   # from its zeros
        plan = st.get("last_good_plan")
        ex.last_good = (good, Plan.from_dict(plan, where="checkpoint last_good_plan") if plan else None, good_masked)
    else:
        ex.last_good = (copy.deepcopy(ex.original), None, [])
    run.log(f"resume at step {st['next_step']}/{n_steps}")
    return st["next_step"]


def _checkpoint(run: Run, ex: Executor, next_step: int) -> None:
    """Weights + executor state (plan, masks, history) + what the last good model was, atomically."""
    good_plan = ex.last_good[1] if ex.last_good else None
    run.save_checkpoint(next_step, ex.model.state_dict(), None,
                        {"next_step": next_step, "executor": ex.state(),
                         "last_good_plan": good_plan.to_dict() if good_plan is not None else None,
                         "last_good_masked": list(ex.last_good[2]) if ex.last_good else []})


def rebuild_from_checkpoint(run: Run, ex: Executor) -> nn.Module:
    """The model of the latest checkpoint (the last good state before a failed step)."""
    weights, st = run.load_checkpoint(restore_rng=False)
    probe = Executor(ex.original, example_inputs=ex.example_inputs)
    probe.load_state(st["executor"], weights)
    ex.plan, ex.masked = probe.plan, probe.masked
    return probe.model


def _fmt(values: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _record(rec, ex: Executor, original: nn.Module, recipe: Recipe) -> None:
    """metrics.json in prunekit.report's format: one "steps" row per pruning step, summary rows, widths."""
    rows = []
    params0 = count_params(original)
    quality = None
    for h in ex.history:
        if h["kind"] == "evaluate":
            quality = h["value"]
        if h["kind"] == "prune" and "macs_after" in h:
            rows.append({"step": h["index"], "speedup": h.get("latency_achieved", h["macs_before"] / max(1, h["macs_after"])),
                         "quality": quality, "params": h["params_after"],
                         "macs": h["macs_after"]})
        elif h["kind"] == "evaluate" and rows:
            rows[-1]["quality"] = h["value"]
    if rows:
        rec.set("steps", rows)
    evals = [h for h in ex.history if h["kind"] == "evaluate"]
    if evals:
        last = evals[-1]
        summary_rows = [{"variant": "dense", "quality": last["dense"], "params": params0}]
        pruned = {"variant": "pruned", "quality": last["value"], "params": last["params"]}
        if "latency_ms" in last:
            summary_rows[0]["latency_ms"] = last["dense_ms"]
            pruned["latency_ms"] = last["latency_ms"]
        summary_rows.append(pruned)
        rec.set("summary", {"metric": last["metric"], "higher_is_better": last["metric"] != "perplexity",
                            "batch_size": 16, "rows": summary_rows})
        if "slices" in last:
            rec.set("slices", last["slices"])
    rec.set("widths", _widths(original, ex.model))

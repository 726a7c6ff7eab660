"""The recovery loop: distillation / task fine-tuning with AdamW, warm-up + cosine, clipping, DDP, resumable
checkpoints and a non-finite-loss guard."""
from __future__ import annotations

import copy
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from prunekit.batch import batch_size_of, call_model, eval_mode, model_device, rank_world, split_batch, take, to_device
from prunekit.data import load
from prunekit.errors import CalibrationDataError, ConfigError, InputTypeError, RecoveryDiverged
from prunekit.objective import logits_of, task_loss
from prunekit.recover import distributed as D
from prunekit.recover.common import RecoverResult, apply_lora, lr_at, param_groups, resolve_loss
from prunekit.recover.losses import FeatureTap, feature_loss, kd_loss, make_projection
from prunekit.recover.options import Recover
from prunekit.recover.teacher import TeacherCache
from prunekit.recover.tokens import recover_tokens
from prunekit.run.directory import Run, seed_everything


# --------------------------------------------------------------------------------------------- helpers


class _Student(nn.Module):
    """The trained module: the model plus feature projections, one forward returning (output, features).

    Wrapping both in one module lets DDP average the projections' gradients with the model's, and makes
    the checkpoint a single state dict."""

    def __init__(self, model: nn.Module, tap: Optional[FeatureTap]):
        super().__init__()
        self.model = model
        self.projections = nn.ModuleList()
        self._tap = [tap]                       # in a list: not a submodule, not in the state dict

    def forward(self, inputs):
        out = call_model(self.model, inputs)
        tap = self._tap[0]
        feats = [] if tap is None else [proj(f) for proj, f in zip(self.projections, tap.take())]
        return out, feats


def _as_sequence(data: Any) -> Sequence:
    """Random-access batches: Batches/lists are used as they are; other iterables are read once into a
    list (so every epoch, and a resume, sees the same batches)."""
    if isinstance(data, str):
        data = load(data, split="train")
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (dict, torch.Tensor)):
        seq = data
    else:
        try:
            seq = list(data)
        except TypeError:
            raise InputTypeError(f"recover(data=...) must be batches (a list, prunekit.data.Batches, or any iterable "
                                 f"of (inputs, targets) or inputs), got {type(data).__name__}") from None
    if len(seq) == 0:
        raise CalibrationDataError("recover(data=...) holds no batches")
    return seq


def _epoch_order(n: int, epoch: int, cfg: Recover) -> List[int]:
    """Batch order of one epoch, a pure function of (seed, epoch): resumes recompute or reload it."""
    if not cfg.shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# --------------------------------------------------------------------------------------------- main loop


def recover(model: nn.Module, teacher: Optional[nn.Module] = None, data: Any = None,
            config: Optional[Recover] = None, *, checkpoint_dir: Optional[str] = None,
            callback: Optional[Callable[[Dict[str, Any]], Optional[bool]]] = None, quiet: bool = False,
            device: Optional[torch.device] = None, task_loss_fn: Optional[Callable] = None,
            return_result: bool = False, tokenizer=None, eval_data=None, **options):
    """Fine-tune a pruned `model` (in place) back towards `teacher`; returns the recovered model.

    data:     batches, each `(inputs, targets)` or inputs alone (distillation needs no labels); inputs are a
              tensor, a tuple (model(*inputs)) or a dict (model(**inputs)). Or a dataset name from
              prunekit.data. Per epoch the batch order is shuffled with (seed, epoch).
    config:   a `Recover`; keyword `options` override its fields (recover(m, t, d, epochs=3, lr=1e-3)).
    checkpoint_dir: a run directory (prunekit.runs): checkpoints every `checkpoint_every` steps and at each
              epoch end; if it already holds a checkpoint, training resumes from it (same final weights
              as an uninterrupted run, bit for bit).
    callback: called as callback(event_dict) after every step ({"event": "step", ...}) and epoch
              ({"event": "epoch_end", ...}), after the checkpoint; returning False stops training.
    task_loss_fn: custom task loss `fn(model_output, targets) -> scalar` instead of cross-entropy.
    tokens=N (a Recover field) switches to token-budget recovery of a causal LM (recover/tokens.py): data is
              then text (a file/directory path, or an iterable of strings with `tokenizer=`) or token ids,
              packed into seq_len blocks and streamed; `eval_data` (perplexity windows) is evaluated every
              `eval_every` tokens.

    Side effects, on purpose: torch/numpy/python RNGs are seeded with `seed` (reproducible runs), and the
    model and teacher are moved to `device` (default: the model's device); the teacher is used in eval mode
    and its mode restored at the end.

    Parametrized weights (torch.nn.utils.parametrize masks) stay parametrized, so masked entries stay zero.
    In a torch.distributed job (torchrun) the model is wrapped in DDP and each global batch is split
    across processes; BatchNorm then sees per-process statistics, as with any DDP training.
    """
    cfg = (config if config is not None else Recover())
    if not isinstance(cfg, Recover):
        raise InputTypeError(f"recover(config=...) must be a prunekit Recover config, got {type(cfg).__name__}")
    if options:
        cfg = cfg.replace(**options)
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"recover(model): expected a torch.nn.Module, got {type(model).__name__}")
    if teacher is model:
        raise ConfigError("recover(): teacher is the same object as the model being trained; pass an unpruned "
                          "copy (e.g. copy.deepcopy(model) taken before pruning)")
    if data is None and not isinstance(teacher, TeacherCache):
        raise CalibrationDataError("recover() needs data=...: batches of (inputs, targets) or inputs alone")
    if isinstance(teacher, TeacherCache):
        teacher.check(cfg)                           # a precomputed teacher serves only token-budget KD
    if cfg.tokens is not None:
        return _recover_tokens(model, teacher, data, cfg, checkpoint_dir, callback, quiet, device, return_result,
                               tokenizer, eval_data)
    return _recover_batches(model, teacher, data, cfg, checkpoint_dir, callback, quiet, device, task_loss_fn,
                            return_result)


def _recover_batches(model, teacher, data, cfg: Recover, checkpoint_dir, callback, quiet, device, task_loss_fn,
                     return_result):
    """The epoch/batch recovery `recover` runs when no token budget is given."""
    data_spec = data if isinstance(data, str) else None
    batches = _as_sequence(data)
    if cfg.teacher_device is not None:
        raise ConfigError("Recover.teacher_device applies to token-budget recovery (tokens=N); for batch recovery "
                          "leave it None (the teacher runs on the model's device)")
    mode = resolve_loss(cfg, teacher)
    distributed = D.maybe_init_process_group()
    rank, world = rank_world()
    device = torch.device(device) if device is not None else model_device(model)

    seed_everything(cfg.seed)
    was_training = model.training
    base_model = model
    if cfg.lora:
        model = apply_lora(model, cfg.lora)
    model.to(device)
    pairs = cfg.feature_pairs()
    s_tap = FeatureTap(model.get_base_model() if cfg.lora else model, [s for s, _ in pairs], "model") if pairs else None
    t_tap = FeatureTap(teacher, [t for _, t in pairs], "teacher") if pairs else None
    student = _Student(model, s_tap)
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.to(device).eval()
    try:
        if pairs:
            _build_projections(student, teacher, t_tap, to_device(split_batch(batches[0])[0], device))
        student.to(device)
        fsdp = distributed and cfg.strategy == "fsdp"
        if fsdp:
            if checkpoint_dir is not None or cfg.lora:
                raise ConfigError("Recover(strategy='fsdp') supports neither checkpoint_dir nor lora yet; use "
                                  "strategy='ddp' for those")
            unsharded = copy.deepcopy(student.model)      # receives the gathered weights at the end
            D.shard_fsdp(student, device)
        optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr)
        run = Run(checkpoint_dir) if checkpoint_dir is not None else None
        loop = _Loop(cfg, student, teacher, t_tap, optimizer, batches, device, mode, run, callback, quiet,
                     task_loss_fn, distributed, rank, world, data_spec)
        result = loop.run()
        if fsdp:
            unsharded.load_state_dict(D.full_state_dict(student.model))
    finally:
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.remove()
        if teacher is not None:
            teacher.train(teacher_was_training)
    if cfg.lora:
        model = model.merge_and_unload()
        result.model = model
    elif fsdp:
        result.model = unsharded          # fully_shard turned `model` into a sharded module: return a plain copy
    else:
        result.model = base_model
    return _finish(result, cfg, was_training, return_result)


def _recover_tokens(model, teacher, data, cfg, checkpoint_dir, callback, quiet, device, return_result, tokenizer,
                    eval_data):
    """The token-budget path of `recover`: seeding, devices and the teacher's mode as in the epoch loop."""
    mode = resolve_loss(cfg, teacher)
    device = torch.device(device) if device is not None else model_device(model)
    seed_everything(cfg.seed)
    live = isinstance(teacher, nn.Module)               # else None or a precomputed TeacherCache
    was_training, teacher_was_training = model.training, teacher.training if live else False
    model.to(device)
    if live:
        teacher.to(cfg.teacher_device if cfg.teacher_device is not None else device).eval()
    try:
        result = recover_tokens(model, teacher, data, cfg, mode, device=device, tokenizer=tokenizer,
                                eval_data=eval_data, checkpoint_dir=checkpoint_dir, callback=callback, quiet=quiet)
    finally:
        if live:
            teacher.train(teacher_was_training)
    return _finish(result, cfg, was_training, return_result)


def _finish(result, cfg: Recover, was_training: bool, return_result: bool):
    """Restore the model's mode; a diverged run raises RecoveryDiverged or warns, as `on_nonfinite` says."""
    result.model.train(was_training)
    if result.status == "diverged":
        if cfg.on_nonfinite == "raise":
            raise RecoveryDiverged(result.message, result.model, result)
        warnings.warn(result.message, RuntimeWarning, stacklevel=3)
    return result if return_result else result.model


def _build_projections(student: _Student, teacher: nn.Module, t_tap: FeatureTap, inputs) -> None:
    """Run both models once (eval mode, no grad) to learn feature shapes and create the projections.

    Eval mode keeps BatchNorm running statistics untouched by this probe."""
    with eval_mode(student.model), torch.no_grad():
        call_model(student.model, inputs)
        s_feats = student._tap[0].take()
        call_model(teacher, inputs)
        t_feats = t_tap.take()
    for (s_name, t_name), s, t in zip(zip(student._tap[0].names, t_tap.names), s_feats, t_feats):
        student.projections.append(make_projection(s, t, f"model.{s_name} -> teacher.{t_name}"))


class _Loop:
    """State and steps of one recovery run (split out of `recover` to keep each function short)."""

    def __init__(self, cfg, student, teacher, t_tap, optimizer, batches, device, mode, run, callback, quiet,
                 task_loss_fn, distributed, rank, world, data_spec):
        self.cfg, self.student, self.teacher, self.t_tap = cfg, student, teacher, t_tap
        self.optimizer, self.batches, self.device, self.mode = optimizer, batches, device, mode
        self.run_dir, self.callback, self.task_loss_fn = run, callback, task_loss_fn
        self.distributed, self.rank, self.world = distributed, rank, world
        self.quiet = quiet or rank != 0 or not sys.stderr.isatty()
        self.steps_per_epoch = len(batches)
        self.total = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total = min(self.total, cfg.max_steps)
        self.epoch, self.next_batch, self.step = 0, 0, 0
        self.order: Optional[List[int]] = None
        self.loss_sum, self.loss_count = 0.0, 0
        self.history: List[Dict[str, float]] = []
        self.data_spec = data_spec
        self.trainable = [p for p in student.parameters() if p.requires_grad]

    # ---- checkpoints
    def _state(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "global_step": self.step,
                "order": self.order, "loss_sum": self.loss_sum, "loss_count": self.loss_count,
                "history": self.history, "num_batches": self.steps_per_epoch}

    def _save(self) -> None:
        if self.run_dir is not None:
            self.run_dir.save_checkpoint(self.step, self.student.state_dict(), self.optimizer, self._state())

    def _restore(self) -> bool:
        if self.run_dir is None:
            return False
        self.run_dir.check_or_write_config({"recover": self.cfg.to_dict(), "data": self.data_spec,
                                            "world_size": self.world})
        loaded = self.run_dir.load_checkpoint(self.optimizer)
        if loaded is None:
            self.run_dir.log(f"start: {self.total} steps, {self.steps_per_epoch} batches/epoch, world {self.world}")
            return False
        model_state, st = loaded
        if st["num_batches"] != self.steps_per_epoch:
            raise ConfigError(f"checkpoint in {self.run_dir.path} was made with {st['num_batches']} batches per "
                              f"epoch, but data now has {self.steps_per_epoch}; resume with the same data")
        self.student.load_state_dict(model_state, strict=True)
        self.epoch, self.next_batch, self.step = st["epoch"], st["next_batch"], st["global_step"]
        self.order, self.history = st["order"], st["history"]
        self.loss_sum, self.loss_count = st["loss_sum"], st["loss_count"]
        self.run_dir.log(f"resume at step {self.step} (epoch {self.epoch}, batch {self.next_batch})")
        return True

    # ---- loop
    def run(self) -> RecoverResult:
        self._restore()
        net = self.student
        if self.distributed and self.cfg.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.student.train()
        from tqdm.auto import tqdm
        status, message = "completed", ""
        while self.epoch < self.cfg.epochs and self.step < self.total:
            if self.order is None:
                self.order = _epoch_order(self.steps_per_epoch, self.epoch, self.cfg)
            bar = tqdm(total=self.steps_per_epoch, initial=self.next_batch, disable=self.quiet,
                       desc=f"recover epoch {self.epoch + 1}/{self.cfg.epochs}")
            try:
                while self.next_batch < self.steps_per_epoch and self.step < self.total:
                    loss, bad = self._train_step(net, self.batches[self.order[self.next_batch]])
                    if bad:
                        status, message = "diverged", self._diverged_message(loss)
                        break
                    self.next_batch += 1
                    self.step += 1
                    self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    epoch_done = self.next_batch == self.steps_per_epoch or self.step == self.total
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and not epoch_done:
                        self._save()
                    if self._notify({"event": "step", "epoch": self.epoch, "step": self.step, "loss": loss,
                                     "lr": self.optimizer.param_groups[0]["lr"]}) is False:
                        status, message = "stopped", f"stopped by callback after step {self.step}"
                        break
            finally:
                bar.close()
            if status != "completed":
                break
            self._end_epoch()
            if self._notify({"event": "epoch_end", "epoch": self.epoch - 1, "step": self.step,
                             "loss": self.history[-1]["loss"]}) is False:
                status, message = "stopped", f"stopped by callback after epoch {self.epoch}"
                break
        if self.run_dir is not None:
            self.run_dir.set_final(status=status, steps=self.step, message=message,
                                   loss=self.history[-1]["loss"] if self.history else None)
            self.run_dir.log(f"{status} after {self.step} steps {message}".rstrip())
        return RecoverResult(self.student.model, status, self.step, list(self.history), message)

    def _end_epoch(self) -> None:
        row = {"epoch": self.epoch, "step": self.step, "loss": self.loss_sum / max(1, self.loss_count)}
        self.history.append(row)
        if self.run_dir is not None:
            self.run_dir.log_metrics(self.step, epoch=self.epoch, loss=row["loss"])
            self.run_dir.log(f"epoch {self.epoch} done: step {self.step}, mean loss {row['loss']:.6f}")
        self.epoch, self.next_batch, self.order = self.epoch + 1, 0, None
        self.loss_sum, self.loss_count = 0.0, 0
        self._save()

    def _notify(self, event: Dict[str, Any]):
        return self.callback(event) if self.callback is not None else None

    def _diverged_message(self, loss: float) -> str:
        return (f"recover(): non-finite loss or gradient ({loss}) at epoch {self.epoch}, batch {self.next_batch} "
                f"(optimizer step {self.step + 1}); training stopped and the weights from before this step were "
                f"kept (the last good ones, after {self.step} steps). Check the inputs for NaN/inf, lower "
                f"lr (now {self.cfg.lr}) or set grad_clip.")

    def _train_step(self, net: nn.Module, batch: Any) -> Tuple[float, bool]:
        """One optimizer step on one global batch; returns (global mean loss, diverged?).

        Parameters only change in optimizer.step(), which a non-finite loss/gradient skips, so "restore the
        last good weights" only has to put back buffers (BatchNorm statistics) the bad forward touched."""
        inputs, targets = split_batch(batch)
        n_global = batch_size_of(inputs)
        scale = 1.0
        if self.distributed:
            lo, hi = D.shard_bounds(n_global, self.rank, self.world)
            inputs, targets = take(inputs, lo, hi), take(targets, lo, hi)
            scale = self.world * (hi - lo) / n_global         # DDP averages: sum_r (n_r / n) * loss_r
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        buffers = {k: b.detach().clone() for k, b in self.student.named_buffers()}
        out, s_feats = net(inputs)
        loss = self._loss(out, s_feats, inputs, targets)
        (loss * scale).backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        if hasattr(grad_norm, "full_tensor"):              # FSDP: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
        local_bad = not (torch.isfinite(loss).item() and torch.isfinite(grad_norm).item())
        bad = D.all_reduce_max(float(local_bad), self.device) > 0
        global_loss = D.all_reduce_sum(loss.item() * scale, self.device) / self.world
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, b in self.student.named_buffers():
                    b.copy_(buffers[k])
            return global_loss, True
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.total, self.cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return global_loss, False

    def _loss(self, out, s_feats, inputs, targets) -> torch.Tensor:
        cfg = self.cfg
        t_out, t_feats = None, []
        if self.teacher is not None and (self.mode in ("kd", "mixed") or s_feats):
            with torch.no_grad():
                t_out = call_model(self.teacher, inputs)
                t_feats = self.t_tap.take() if self.t_tap is not None else []
        parts = []
        if self.mode in ("kd", "mixed"):
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            kd = kd_loss(logits_of(out), logits_of(t_out), cfg.temperature, mask)
            parts.append(kd if self.mode == "kd" else cfg.alpha * kd)
        if self.mode in ("task", "mixed"):
            task = self.task_loss_fn(out, targets) if self.task_loss_fn else task_loss(out, targets)
            parts.append(task if self.mode == "task" else (1 - cfg.alpha) * task)
        if s_feats:
            parts.append(cfg.feature_weight * feature_loss(s_feats, t_feats))
        return torch.stack([p.float() for p in parts]).sum()

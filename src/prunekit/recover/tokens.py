"""Token-budget recovery of causal LMs: distill (or fine-tune) a pruned LM on packed, streamed text.

    student = pk.recover(pruned, teacher=model, data=texts, tokenizer=tok, tokens=200_000, seq_len=512,
                         loss="kd", top_k=64, grad_accum=4, eval_data=windows, eval_every=50_000,
                         checkpoint_dir="runs/rec")

`recover()` comes here when `tokens=` is set. One optimizer step sees batch_size * grad_accum blocks of
seq_len tokens (recover/stream.py packs them); the run ends after ceil(tokens / that) steps. Losses:
"kd" (KL to the teacher's logits at temperature T, optionally on its top-k logits only), "task" (next-token
cross-entropy), "mixed" (alpha * kd + (1 - alpha) * lm); `hidden_weight` adds a loss on the last hidden
state. The teacher runs under torch.inference_mode. Checkpoints (run/directory.py) hold weights, AdamW
state, RNG and the stream position; a resume re-reads the stream up to that position, so the final weights
equal an uninterrupted run's bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from prunekit.batch import rank_world
from prunekit.errors import ConfigError
from prunekit.evaluate.core import evaluate
from prunekit.objective import logits_of
from prunekit.recover import distributed as D
from prunekit.recover.common import RecoverResult, lr_at, param_groups
from prunekit.recover.losses import hidden_loss, kd_loss, lm_loss, topk_kd_loss
from prunekit.recover.options import Recover
from prunekit.recover.stream import PackedTokens
from prunekit.recover.teacher import TeacherCache, device_of, teacher_outputs
from prunekit.run.directory import Run


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: forced by "bf16"; with "auto" only on a CUDA device that supports bf16 (on CPUs without
    bf16 matrix units autocast is slower than fp32)."""
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def _enable_checkpointing(model: nn.Module) -> None:
    """HF's activation (gradient) checkpointing: recompute each block's activations in backward."""
    if hasattr(model, "activation_checkpointing_enable"):                   # transformers >= 5 name
        model.activation_checkpointing_enable({"use_reentrant": False})
        return
    fn = getattr(model, "gradient_checkpointing_enable", None)
    if fn is None:
        raise ConfigError(f"Recover.gradient_checkpointing=True needs a model with gradient_checkpointing_enable() "
                          f"(Hugging Face models have it); {type(model).__name__} has not: set it to False")
    fn(gradient_checkpointing_kwargs={"use_reentrant": False})


class TokenLoop:
    """State and steps of one token-budget run (split from `recover_tokens` to keep functions short)."""

    def __init__(self, model, teacher, stream: PackedTokens, cfg: Recover, mode: str, device, run: Optional[Run],
                 eval_data, callback, quiet: bool, data_spec):
        self.model, self.teacher, self.stream, self.cfg, self.mode = model, teacher, stream, cfg, mode
        self.device, self.run_dir, self.eval_data, self.callback = device, run, eval_data, callback
        self.distributed = D.maybe_init_process_group()
        self.rank, self.world = rank_world()
        self.quiet = quiet or self.rank != 0 or not sys.stderr.isatty()
        self.tokens_per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum
        self.total = max(1, math.ceil(cfg.tokens / self.tokens_per_step))
        if cfg.max_steps is not None:
            self.total = min(self.total, cfg.max_steps)
        self.bf16 = use_bf16(cfg.precision, device)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.step, self.history, self.data_spec = 0, [], data_spec
        self.loss_sum, self.loss_n, self.seconds = 0.0, 0, 0.0

    # ---- checkpoints
    def restore(self) -> None:
        if self.run_dir is None:
            return
        self.run_dir.check_or_write_config({"recover": self.cfg.to_dict(), "data": self.data_spec,
                                            "world_size": self.world})
        loaded = self.run_dir.load_checkpoint(self.optimizer)
        if loaded is None:
            self.run_dir.log(f"start: {self.total} steps of {self.tokens_per_step} tokens, world {self.world}")
            return
        if not self.stream.resumable:
            raise ConfigError(f"{self.run_dir.path} holds a checkpoint, but data is a one-shot generator that cannot "
                              f"be re-read to the stored position; pass a list, a path or a callable")
        weights, st = loaded
        self.model.load_state_dict(weights, strict=True)
        self.step, self.history = st["global_step"], st["history"]
        self.loss_sum, self.loss_n, self.seconds = st["loss_sum"], st["loss_n"], st["seconds"]
        self.run_dir.log(f"resume at step {self.step} ({self.step * self.tokens_per_step} tokens)")

    def save(self) -> None:
        if self.run_dir is not None:
            st = {"global_step": self.step, "history": self.history, "loss_sum": self.loss_sum,
                  "loss_n": self.loss_n, "seconds": self.seconds, "blocks": self.step * self.cfg.grad_accum}
            self.run_dir.save_checkpoint(self.step, self.model.state_dict(), self.optimizer, st)

    # ---- loop
    def run(self) -> RecoverResult:
        self.restore()
        net = self.model
        if self.distributed and self.cfg.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model.train()
        blocks = self.stream.iter_from(self.step * self.cfg.grad_accum)
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total * self.tokens_per_step, initial=self.step * self.tokens_per_step, unit="tok",
                   unit_scale=True, desc="recover", disable=self.quiet)
        status, message = "completed", ""
        every = max(1, self.total // 50)
        try:
            while self.step < self.total:
                t0 = time.perf_counter()
                loss, bad = self.train_step(net, blocks)
                if bad:
                    status, message = "diverged", (f"recover(): non-finite loss or gradient ({loss}) at optimizer "
                                                   f"step {self.step + 1}; the weights from before it are kept. "
                                                   f"Lower lr (now {self.cfg.lr}) or set grad_clip.")
                    break
                self.seconds += time.perf_counter() - t0
                self.step += 1
                self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
                bar.update(self.tokens_per_step)
                tok_s = self.step * self.tokens_per_step / max(self.seconds, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
                if self.step % every == 0 or self.step == self.total or self.evaluate_due():
                    self.log_row(tok_s)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.step < self.total:
                    self.save()
                if self.callback is not None and self.callback(
                        {"event": "step", "step": self.step, "tokens": self.step * self.tokens_per_step,
                         "loss": loss, "lr": self.optimizer.param_groups[0]["lr"]}) is False:
                    status, message = "stopped", f"stopped by callback after step {self.step}"
                    break
        finally:
            bar.close()
        if status == "completed":
            self.save()
        if self.run_dir is not None:
            self.run_dir.set_final(status=status, steps=self.step, tokens=self.step * self.tokens_per_step,
                                   message=message, history=self.history)
            self.run_dir.log(f"{status} after {self.step} steps {message}".rstrip())
        return RecoverResult(self.model, status, self.step, list(self.history), message)

    def evaluate_due(self) -> bool:
        e = self.cfg.eval_every
        if self.eval_data is None or not e:
            return False
        before, now = (self.step - 1) * self.tokens_per_step, self.step * self.tokens_per_step
        return now // e > before // e

    def log_row(self, tok_s: float) -> None:
        row = {"step": self.step, "tokens": self.step * self.tokens_per_step,
               "loss": self.loss_sum / max(1, self.loss_n), "tok_s": tok_s}
        self.loss_sum, self.loss_n = 0.0, 0
        if self.eval_data is not None and (self.evaluate_due() or self.step == self.total):
            row["eval_ppl"] = float(evaluate(self.model, self.eval_data, "perplexity").value)
            self.model.train()
        self.history.append(row)
        if self.run_dir is not None:
            self.run_dir.log_metrics(self.step, **{k: v for k, v in row.items() if k != "step"})
            self.run_dir.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    @staticmethod
    def next_block(blocks: Iterator) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        """(ids, precomputed targets or None): a TeacherCache stream yields both, a PackedTokens ids alone."""
        item = next(blocks)
        return item if isinstance(item, tuple) else (item, None)

    def train_step(self, net: nn.Module, blocks: Iterator[torch.Tensor]) -> Tuple[float, bool]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss over them, diverged?)."""
        total = 0.0
        for micro in range(self.cfg.grad_accum):
            ids, cached = self.next_block(blocks)
            lo, hi = D.shard_bounds(ids.shape[0], self.rank, self.world)
            ids = ids[lo:hi].to(self.device)
            if cached is not None:
                cached = {k: v[lo:hi].to(self.device) for k, v in cached.items()}
            scale = self.world * (hi - lo) / (self.cfg.batch_size * self.cfg.grad_accum)
            last = micro == self.cfg.grad_accum - 1
            sync = net.no_sync() if (self.distributed and not last and hasattr(net, "no_sync")) else contextlib.nullcontext()
            with sync:
                loss = self.loss(net, ids, cached)
                (loss * scale).backward()
            total += D.all_reduce_sum(loss.item() * scale, self.device) / self.world
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        bad = D.all_reduce_max(float(not (math.isfinite(total) and torch.isfinite(norm).item())), self.device) > 0
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            return total, True
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.total, self.cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, False

    def teacher_targets(self, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The live teacher's targets for `ids` (recover/teacher.py), computed on the teacher's own device (which
        Recover.teacher_device may set apart from the student's) and moved to the student's."""
        t = teacher_outputs(self.teacher, ids.to(device_of(self.teacher)), top_k=self.cfg.top_k,
                            temperature=self.cfg.temperature, want_hidden=self.cfg.hidden_weight > 0, bf16=self.bf16)
        return {k: v.to(self.device) for k, v in t.items()}

    def loss(self, net: nn.Module, ids: torch.Tensor, cached: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The training loss on one micro-batch; `cached`: precomputed teacher targets (a TeacherCache run)."""
        cfg = self.cfg
        if cached is not None:
            t = cached
        elif self.teacher is not None and (self.mode != "task" or cfg.hidden_weight):
            t = self.teacher_targets(ids)
        else:
            t = {}
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            out = net(input_ids=ids, output_hidden_states=cfg.hidden_weight > 0, use_cache=False)
        logits = logits_of(out).float()
        parts: List[torch.Tensor] = []
        if self.mode in ("kd", "mixed"):
            kd = (topk_kd_loss(logits, t["logp"], t["index"], cfg.temperature) if cfg.top_k
                  else kd_loss(logits, t["logits"], cfg.temperature))
            parts.append(kd if self.mode == "kd" else cfg.alpha * kd)
        if self.mode in ("task", "mixed"):
            lm = lm_loss(logits, ids)
            parts.append(lm if self.mode == "task" else (1 - cfg.alpha) * lm)
        if cfg.hidden_weight > 0:
            parts.append(cfg.hidden_weight * hidden_loss(out.hidden_states[-1], t["hidden"]))
        return torch.stack(parts).sum()


def recover_tokens(model: nn.Module, teacher: Optional[nn.Module], data: Any, cfg: Recover, mode: str, *,
                   device: torch.device, tokenizer=None, eval_data=None, checkpoint_dir: Optional[str] = None,
                   callback: Optional[Callable] = None, quiet: bool = False) -> RecoverResult:
    """Run token-budget recovery on `model` (in place, already on `device`); `recover()` is the entry point."""
    if cfg.features or cfg.lora:
        raise ConfigError("Recover(tokens=...) supports neither features= nor lora= yet; use hidden_weight for a "
                          "hidden-state loss, or the epoch loop (tokens=None) for LoRA")
    if mode == "task" and teacher is None and cfg.hidden_weight:
        raise ConfigError("Recover.hidden_weight matches the teacher's hidden states: pass teacher=...")
    if isinstance(teacher, TeacherCache):
        if data is not None and data is not teacher:
            raise ConfigError(f"recover(teacher={teacher!r}) trains on the token blocks stored in the cache; pass "
                              f"data=None (or data=the cache), not other data")
        teacher.check(cfg)
        cfg = cfg.replace(top_k=teacher.top_k)
        stream, data, teacher = teacher, str(teacher.path), None
    else:
        stream = data if isinstance(data, PackedTokens) else PackedTokens(data, cfg.seq_len, cfg.batch_size, tokenizer)
    if (stream.seq_len, stream.batch_size) != (cfg.seq_len, cfg.batch_size):
        raise ConfigError(f"data is a PackedTokens of {stream.batch_size} x {stream.seq_len} but Recover asks for "
                          f"batch_size={cfg.batch_size}, seq_len={cfg.seq_len}; make them agree")
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    fsdp = cfg.strategy == "fsdp" and D.maybe_init_process_group()
    if fsdp:
        if checkpoint_dir is not None:
            raise ConfigError("Recover(strategy='fsdp') does not support checkpoint_dir yet; use strategy='ddp'")
        unsharded = copy.deepcopy(model)                  # receives the gathered weights at the end
        D.shard_fsdp(model, device)
    spec = str(data) if isinstance(data, str) else None
    run = Run(checkpoint_dir) if checkpoint_dir is not None else None
    result = TokenLoop(model, teacher, stream, cfg, mode, device, run, eval_data, callback, quiet, spec).run()
    if fsdp:
        unsharded.load_state_dict(D.full_state_dict(model))
        result.model = unsharded
    return result

"""The teacher side of token-budget distillation: its targets, computed live, offloaded, or precomputed once.

    cache = pk.precompute_teacher(model, texts, "runs/teacher-cache", tokenizer=tok, tokens=200_000,
                                  seq_len=512, batch_size=2, top_k=64, temperature=2.0)
    student = pk.recover(pruned, teacher=cache, tokens=200_000, seq_len=512, batch_size=2, loss="kd",
                         top_k=64, temperature=2.0)

A precomputed cache holds the packed token blocks and, per position, the teacher's `top_k` largest
log-probabilities at `temperature` with their token ids (2k numbers instead of the vocabulary). Training from it
needs no teacher in memory and no teacher forward pass; several students (other prunes, other budgets,
other learning rates) can reuse one cache. A run from a cache gives the same weights as a live top-k run, bit
for bit, when both store float32 (the same function computes the targets).

On disk: `manifest.json` (written last) and `shard-00000.safetensors`, ... each holding up to
`blocks_per_shard` blocks: ids [n, B, L] int64, logp [n, B, L, k], index [n, B, L, k] int32. Every shard is
written atomically; an interrupted precompute resumes at the first missing shard. Loading reads safetensors and
JSON only.

Offloading (`Recover(teacher_device="cpu")`): the teacher runs on another device than the student (e.g. the host
while the student trains on a GPU); its targets are moved to the student's device.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn

from prunekit.batch import progress
from prunekit.errors import ConfigError, DataError
from prunekit.io.atomic import atomic_write_json, save_safetensors_atomic
from prunekit.objective import logits_of
from prunekit.recover.stream import PackedTokens

FORMAT = "prunekit-teacher-cache"
VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def teacher_outputs(teacher: nn.Module, ids: torch.Tensor, *, top_k: Optional[int], temperature: float,
                    want_hidden: bool = False, bf16: bool = False) -> Dict[str, torch.Tensor]:
    """Teacher logits (or its top-k log-probabilities at `temperature` and their ids) and last hidden state, in
    inference mode, cloned into ordinary tensors (inference tensors cannot be saved for a student's backward).
    `ids` must already be on the teacher's device."""
    with torch.inference_mode(), torch.autocast(ids.device.type, torch.bfloat16, enabled=bf16):
        out = teacher(input_ids=ids, output_hidden_states=want_hidden, use_cache=False)
        logits = logits_of(out)                                             # [B, L, V]
        got = {}
        if top_k:
            logp = torch.log_softmax(logits.float() / temperature, -1)
            v, i = logp.topk(min(top_k, logits.shape[-1]), dim=-1)          # [B, L, k]
            got.update(logp=v, index=i)
        else:
            got["logits"] = logits.float()
        if want_hidden:
            got["hidden"] = out.hidden_states[-1].float()
    return {k: t.clone() for k, t in got.items()}


def device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class TeacherCache:
    """A precomputed teacher (see the module docstring); pass it as `recover(teacher=cache)`. It is also the
    data stream: blocks come out in the order they were computed, cycling when the budget exceeds the cache."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise DataError(f"TeacherCache('{self.path}'): no manifest.json, so this is not a finished teacher cache; "
                            f"run pk.precompute_teacher(..., path='{self.path}') (it resumes an interrupted one)")
        m = json.loads(mf.read_text())
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise DataError(f"TeacherCache('{self.path}'): manifest format {m.get('format')!r} version "
                            f"{m.get('version')!r}; expected {FORMAT!r} {VERSION}: precompute it again")
        self.manifest = m
        self.seq_len, self.batch_size, self.top_k = m["seq_len"], m["batch_size"], m["top_k"]
        self.temperature, self.blocks = m["temperature"], m["blocks"]
        self.resumable = True

    @property
    def tokens(self) -> int:
        return self.blocks * self.batch_size * self.seq_len

    def __repr__(self) -> str:
        return (f"TeacherCache('{self.path}', {self.blocks} blocks of {self.batch_size} x {self.seq_len}, "
                f"top_k={self.top_k}, temperature={self.temperature})")

    def check(self, cfg) -> None:
        """Refuse a Recover config the cache cannot serve (before any training)."""
        where = f"recover(teacher=TeacherCache('{self.path}'))"
        if cfg.tokens is None:
            raise ConfigError(f"{where} needs a token budget: pass tokens=N (a precomputed teacher serves token-budget KD)")
        if (cfg.seq_len, cfg.batch_size) != (self.seq_len, self.batch_size):
            raise ConfigError(f"{where}: the cache holds blocks of {self.batch_size} x {self.seq_len} but Recover asks "
                              f"for batch_size={cfg.batch_size}, seq_len={cfg.seq_len}; make them agree")
        if cfg.top_k is not None and cfg.top_k != self.top_k:
            raise ConfigError(f"{where}: the cache holds top_k={self.top_k} teacher log-probabilities but Recover asks "
                              f"for top_k={cfg.top_k}; pass top_k={self.top_k} or precompute again")
        if float(cfg.temperature) != float(self.temperature):
            raise ConfigError(f"{where}: the cache was computed at temperature={self.temperature} but Recover asks for "
                              f"{cfg.temperature}; pass temperature={self.temperature} or precompute again")
        if cfg.hidden_weight:
            raise ConfigError(f"{where}: a cache holds no hidden states; set hidden_weight=0 or pass the teacher model")

    def shard_names(self):
        return [self.path / s for s in self.manifest["shards"]]

    def iter_from(self, skip: int = 0) -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        """(ids [B, L], {"logp", "index"} [B, L, k]) per block, after skipping `skip` blocks; endless."""
        from safetensors.torch import load_file
        per = self.manifest["blocks_per_shard"]
        shard_i, pos = divmod(skip % self.blocks, per)
        names = self.shard_names()
        while True:
            t = load_file(str(names[shard_i]))
            for j in range(pos, t["ids"].shape[0]):
                yield t["ids"][j], {"logp": t["logp"][j].float(), "index": t["index"][j].long()}
            shard_i, pos = (shard_i + 1) % len(names), 0

    def __iter__(self):
        return self.iter_from(0)


def precompute_teacher(teacher: nn.Module, data: Any, path: Union[str, Path], *, tokens: int, tokenizer=None,
                       seq_len: int = 512, batch_size: int = 1, top_k: int = 64, temperature: float = 2.0,
                       dtype: str = "float32", blocks_per_shard: int = 64, quiet: bool = False) -> TeacherCache:
    """Run `teacher` once over `tokens` tokens of `data` (as pk.recover packs them) and store its top-k targets
    in `path`; returns the TeacherCache. Resumes an interrupted run; refuses to mix settings in one directory."""
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"precompute_teacher(teacher): expected a torch.nn.Module, got {type(teacher).__name__}")
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ConfigError(f"precompute_teacher(top_k={top_k!r}): a cache stores top-k targets; give a positive int")
    if dtype not in DTYPES:
        raise ConfigError(f"precompute_teacher(dtype={dtype!r}): choose one of {sorted(DTYPES)}")
    if not (isinstance(tokens, int) and tokens > 0):
        raise ConfigError(f"precompute_teacher(tokens={tokens!r}): give a positive number of tokens")
    root = Path(path)
    per_block = seq_len * batch_size
    n_blocks = -(-tokens // per_block)
    settings = {"format": FORMAT, "version": VERSION, "seq_len": seq_len, "batch_size": batch_size, "top_k": top_k,
                "temperature": float(temperature), "blocks": n_blocks, "blocks_per_shard": blocks_per_shard,
                "dtype": dtype, "teacher": type(teacher).__name__}
    root.mkdir(parents=True, exist_ok=True)
    pending = root / "settings.json"
    if pending.is_file() and json.loads(pending.read_text()) != settings:
        raise ConfigError(f"precompute_teacher(path='{root}'): the directory holds a cache made with other settings "
                          f"({pending.read_text().strip()}); use a new path or delete it")
    atomic_write_json(pending, settings)
    shards = [f"shard-{i:05d}.safetensors" for i in range(-(-n_blocks // blocks_per_shard))]
    done = 0
    while done < len(shards) and (root / shards[done]).is_file():
        done += 1
    stream = data if isinstance(data, PackedTokens) else PackedTokens(data, seq_len, batch_size, tokenizer, repeat=True)
    blocks = stream.iter_from(done * blocks_per_shard)
    dev, was_training = device_of(teacher), teacher.training
    teacher.eval()
    try:
        bar = progress(total=n_blocks * per_block, initial=done * blocks_per_shard * per_block, desc="teacher",
                       quiet=quiet)
        for s in range(done, len(shards)):
            n = min(blocks_per_shard, n_blocks - s * blocks_per_shard)
            ids, logp, index = [], [], []
            for _ in range(n):
                b = next(blocks)
                t = teacher_outputs(teacher, b.to(dev), top_k=top_k, temperature=temperature)
                ids.append(b)
                logp.append(t["logp"].to("cpu", DTYPES[dtype]))
                index.append(t["index"].to("cpu", torch.int32))
                bar.update(per_block)
            save_safetensors_atomic({"ids": torch.stack(ids), "logp": torch.stack(logp),
                                     "index": torch.stack(index)}, root / shards[s])
        bar.close()
    finally:
        teacher.train(was_training)
    atomic_write_json(root / "manifest.json", {**settings, "shards": shards})
    return TeacherCache(root)

"""Runs you can trust: a run directory whose checkpoints survive a kill at any instant and resume bit-exactly.

Layout of a run directory::

    run_dir/
      config.yaml, config.json   the resolved config (written once; a resume checks it has not changed)
      run.log                    timestamped log lines
      metrics.json               {"history": [{"step": .., "name": value, ...}, ...], "final": {...}}
      checkpoints/
        latest.json              {"name": "step-00000012", "step": 12}  <- the only pointer a resume trusts
        step-00000012/
          model.safetensors      weights + buffers
          optimizer.safetensors  every tensor of the optimizer state ("state/<param index>/<key>")
          state.json             optimizer param_groups and non-tensor state, loop position, data order, ...
          rng-rank0.json         torch / numpy / python RNG states of each process

No pickle anywhere (torch.save is pickle, which executes code on load): tensors go to safetensors and
everything else to JSON. A checkpoint is first written to a `*.tmp` directory, fsync'ed, renamed into place
with an atomic rename (io.atomic.swap_in), and only then does `latest.json` (itself temp file + os.replace) point at it. A process
killed mid-write therefore leaves the previous checkpoint as the latest one, never a torn one.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from prunekit.batch import rank_world
from prunekit.errors import RunError
from prunekit.io.atomic import PathLike, atomic_write_json, atomic_write_text, honour_umask, save_safetensors_atomic, swap_in

# --------------------------------------------------------------------------------------------- state <-> files


def optimizer_state_to_files(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON-able rest.

    Tensor entries of the per-parameter state become "state/<param index>/<key>"; scalars stay in JSON.
    Floats survive JSON exactly (Python writes the shortest repr that round-trips)."""
    sd = optimizer.state_dict()
    tensors, plain_state = {}, {}
    for pid, entries in sd["state"].items():
        plain_state[str(pid)] = {}
        for key, val in entries.items():
            if isinstance(val, torch.Tensor):
                tensors[f"state/{pid}/{key}"] = val
            else:
                plain_state[str(pid)][key] = _json_value(val, f"optimizer state[{pid}][{key}]")
    groups = [{k: _json_value(v, f"optimizer param_groups.{k}") for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"state": plain_state, "param_groups": groups}


def optimizer_state_from_files(tensors: Dict[str, torch.Tensor], plain: Dict[str, Any]) -> Dict[str, Any]:
    """Inverse of `optimizer_state_to_files`: a dict for `optimizer.load_state_dict`."""
    state: Dict[int, Dict[str, Any]] = {int(pid): dict(entries) for pid, entries in plain["state"].items()}
    for name, val in tensors.items():
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = val
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


def _json_value(v, where: str):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_json_value(x, where) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x, where) for k, x in v.items()}
    raise RunError(f"{where} holds a {type(v).__name__}, which a checkpoint cannot store without pickle")


def rng_state() -> Dict[str, Any]:
    """torch (CPU + CUDA), numpy and python RNG states as JSON-able data (bytes as int lists)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {"torch": torch.get_rng_state().tolist(),
           "numpy": {"algo": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
           "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["algo"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python RNGs (what a fresh run does before its first random draw)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------- run directory


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fingerprint(obj: Any) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and plain value in `obj` (a state_dict, batches, or
    any nesting of dicts / lists / tuples / iterables of them): what a run was started on."""
    h = hashlib.sha256()

    def walk(x, key: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{t.dtype}:{tuple(x.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k], f"{key}.{k}")
        elif isinstance(x, (list, tuple)) or (hasattr(x, "__iter__") and not isinstance(x, (str, bytes))
                                               and iter(x) is not x):          # never consume a one-shot iterator
            for i, v in enumerate(x):
                walk(v, f"{key}[{i}]")
        else:
            h.update(f"{key}={x!r};".encode())
    walk(obj, "")
    return h.hexdigest()


_WHAT = {"fingerprint.model": "the input model's weights", "fingerprint.data": "the data (train/val batches)"}


def _config_diff(old: Any, new: Any, prefix: str = "") -> list:
    """[(dotted key, old value, new value)] for every leaf that differs between two JSON-like configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _config_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


class Run:
    """One run directory (see the module docstring for its layout).

    In a torch.distributed job every process opens the same directory (shared filesystem); rank 0 writes
    config, logs, metrics and weights, each rank writes its own RNG state."""

    def __init__(self, path: PathLike, keep: int = 2):
        self.path = Path(path)
        self.keep = keep
        self.rank, self.world = rank_world()
        if self.rank == 0:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        _barrier()

    # ---- config
    def write_config(self, config: Dict[str, Any]) -> None:
        """Store the resolved config as YAML (for people) and JSON (for programs)."""
        if self.rank != 0:
            return
        import yaml
        atomic_write_json(self.path / "config.json", config)
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> Optional[Dict[str, Any]]:
        p = self.path / "config.json"
        return json.loads(p.read_text()) if p.exists() else None

    def check_or_write_config(self, config: Dict[str, Any]) -> None:
        """First call writes the config; later calls (resumes) insist it is unchanged, naming what differs.

        Resuming with other options would silently mix two runs and break the bit-exact guarantee."""
        old = self.read_config()
        if old is None:
            self.write_config(config)
            return
        config = json.loads(json.dumps(config))                          # tuples -> lists, as stored
        if "fingerprint" not in old:                                     # started before fingerprints existed
            config.pop("fingerprint", None)
        diff = sorted(_config_diff(old, config), key=lambda d: (not d[0].startswith("fingerprint"), d[0]))
        if diff:
            k, a, b = diff[0]
            what = _WHAT.get(k)
            first = (f"{what} changed (sha256 {str(a)[:12]}... when started, {str(b)[:12]}... now)" if what else
                     f"{k}: stored {a!r} vs now {b!r}")
            more = f" (+{len(diff) - 1} more differences)" if len(diff) > 1 else ""
            raise RunError(f"run directory {self.path} was started on something else: {first}{more}. Resume with "
                           f"the same model, data and recipe, or use a new run directory.")

    @contextlib.contextmanager
    def locked(self):
        """Hold an exclusive lock on `run.lock` (rank 0) while a process works in this run directory; a second
        process fails at once with RunError. The kernel drops the lock when the process dies."""
        if self.rank != 0:
            yield
            return
        fd = os.open(self.path / "run.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise RunError(f"run directory {self.path} is in use by another prunekit process (pid {holder}); "
                               f"wait for it to finish or stop it, then resume") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)                                                 # releases the flock

    # ---- logs and metrics
    def log(self, message: str) -> None:
        if self.rank != 0:
            return
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(self.path / "run.log", "a", encoding="utf-8") as f:
            f.write(f"{stamp} {message}\n")

    def read_metrics(self) -> Dict[str, Any]:
        """metrics.json as a dict. Keys written by others (prunekit.report's "summary", "steps", ...) are kept
        on every rewrite: this class only owns "history" (per-epoch rows) and "final"."""
        p = self.path / "metrics.json"
        return json.loads(p.read_text()) if p.exists() else {"history": [], "final": {}}

    def log_metrics(self, step: int, **values: float) -> None:
        """Append one row to metrics.json's history (rewritten atomically; fine for per-epoch rows).

        Rows at or past `step` from an interrupted attempt are dropped first, so a resumed run's history
        matches an uninterrupted one."""
        if self.rank != 0:
            return
        m = self.read_metrics()
        m["history"] = [r for r in m.get("history", []) if r["step"] < step] + [{"step": step, **values}]
        atomic_write_json(self.path / "metrics.json", m)

    def set_final(self, **values: Any) -> None:
        if self.rank != 0:
            return
        m = self.read_metrics()
        m["final"] = values
        atomic_write_json(self.path / "metrics.json", m)

    # ---- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Optional[Path]:
        """The directory `latest.json` points at, or None for a fresh run. Leftover `*.tmp` dirs are ignored."""
        p = self.checkpoint_root / "latest.json"
        if not p.exists():
            return None
        try:
            name = json.loads(p.read_text())["name"]
        except (ValueError, KeyError, TypeError) as e:
            raise RunError(f"{p} is not a valid checkpoint pointer ({e}); delete it to restart from scratch") from e
        if not isinstance(name, str) or not re.fullmatch(r"step-\d{8}", name):
            raise RunError(f"{p} names checkpoint {name!r}, which is not a step-NNNNNNNN directory of this run; "
                           f"delete {p} to restart from scratch")
        ckpt = self.checkpoint_root / name
        if not (ckpt / "state.json").exists():
            raise RunError(f"{p} points at {ckpt}, which is missing or incomplete; the run directory was "
                           f"modified by hand? Delete {p} to restart from scratch.")
        return ckpt

    def save_checkpoint(self, step: int, model_state: Dict[str, torch.Tensor],
                        optimizer: Optional[torch.optim.Optimizer], state: Dict[str, Any]) -> Path:
        """Write checkpoint `step` atomically (all ranks must call; they exchange nothing but barriers)."""
        name = f"step-{step:08d}"
        tmp = self.checkpoint_root / (name + ".tmp")
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)                                      # a torn attempt from a killed run
            tmp.mkdir(parents=True)
            honour_umask(tmp, directory=True)
        _barrier()
        atomic_write_json(tmp / f"rng-rank{self.rank}.json", rng_state())
        _barrier()
        if self.rank == 0:
            save_safetensors_atomic(model_state, tmp / "model.safetensors")
            full_state = {"step": step, "world_size": self.world, **state}
            if optimizer is not None:
                opt_tensors, opt_plain = optimizer_state_to_files(optimizer)
                save_safetensors_atomic(opt_tensors, tmp / "optimizer.safetensors")
                full_state["optimizer"] = opt_plain
            atomic_write_json(tmp / "state.json", full_state)
            swap_in(tmp, self.checkpoint_root / name)            # fsyncs the tree; an old step-N is replaced whole
            atomic_write_json(self.checkpoint_root / "latest.json", {"name": name, "step": step})
            self._prune_old(keep_name=name)
        _barrier()
        return self.checkpoint_root / name

    def _prune_old(self, keep_name: str) -> None:
        done = sorted(p for p in self.checkpoint_root.glob("step-*") if not p.name.endswith(".tmp"))
        for p in done[:-self.keep]:
            if p.name != keep_name:
                shutil.rmtree(p, ignore_errors=True)

    def load_checkpoint(self, optimizer: Optional[torch.optim.Optimizer] = None,
                        restore_rng: bool = True) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
        """(model_state, state) of the latest checkpoint, loading optimizer state and this rank's RNG state
        in place; None when there is no checkpoint yet."""
        from safetensors.torch import load_file
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return None
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("world_size", 1) != self.world:
            raise RunError(f"checkpoint {ckpt} was written by {state.get('world_size')} processes but this job "
                           f"has {self.world}; resume with the same number of processes (RNG and sharding "
                           f"are per process).")
        model_state = load_file(str(ckpt / "model.safetensors"))
        if optimizer is not None and "optimizer" in state:
            opt_tensors = load_file(str(ckpt / "optimizer.safetensors"))
            optimizer.load_state_dict(optimizer_state_from_files(opt_tensors, state["optimizer"]))
        if restore_rng:
            set_rng_state(json.loads((ckpt / f"rng-rank{self.rank}.json").read_text()))
        return model_state, state

"""Calibration engine: run calibration batches through a model one transformer block at a time.

Data-aware pruning (Wanda, SparseGPT, OWL) needs statistics of the inputs of every linear layer. Running the
whole model with hooks on every layer keeps every layer's statistics alive at once (a SparseGPT Hessian per
layer). The layer-wise pipeline instead

1. finds the list of repeated blocks (`find_blocks`: the nn.ModuleList holding the most parameters, e.g.
   `model.layers`, `transformer.h`, `encoder.layer`);
2. captures what the first block receives (`capture_block_inputs`): a forward pre-hook records its args and
   kwargs -- hidden states, attention mask, rotary cos/sin, position ids, whatever the family passes -- and
   stops the forward by raising a private exception, so no later layer runs;
3. runs all captured batches through block i with the caller's hooks attached (`observe`), lets the caller
   change the block (`update`), then feeds the block's outputs to block i+1 -- the *pruned* block's outputs
   when `sequential=True` (errors of earlier blocks are compensated later), the dense outputs otherwise.

Captured activations live on the CPU (`offload="cpu"`) or in a temporary directory (`offload="disk"`), so
peak memory is about one block, its statistics and the activation buffer. `run_whole` is the whole-model
alternative (one forward per batch, hooks everywhere); `measure_peak_memory` compares the two.

Assumption: every block receives the same extra arguments as the first one (true for Llama, Mistral, Qwen,
GPT-2, OPT, BERT); families that alternate masks per layer need `run_whole`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from prunekit.batch import call_batch, eval_mode, map_tensors, model_device
from prunekit.errors import ConfigError, GraphError, InputTypeError

__all__ = ["find_blocks", "chain_break", "hidden_input", "hidden_output", "ActivationBuffer", "capture_block_inputs",
           "run_layerwise", "run_whole"]

Observe = Callable[[int, str, nn.Module], List[Any]]   # returns hook handles (anything with .remove())
Update = Callable[[int, str, nn.Module], None]


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass right after the first block's inputs are known."""


# ------------------------------------------------------------------------------------------------ blocks

def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the nn.ModuleList of same-class modules with the most
    parameters (`model.layers` in Llama/OPT, `transformer.h` in GPT-2, `encoder.layer` in BERT).

    Picking by parameter count rather than by attribute name keeps it family-agnostic and skips small lists
    (heads, experts inside a block). Raises ValueError when the model has no such list."""
    best, best_params = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > best_params:
            best, best_params = (name, mod), n
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks with parameters; "
                          f"use the whole-model pipeline (pipeline='whole') instead")
    return best


@torch.no_grad()
def chain_break(model: nn.Module, layers: nn.ModuleList, batch: Dict[str, Any]) -> Optional[str]:
    """None when `layers` form a chain on `batch` (each block runs once, in order, and block i+1 receives
    exactly block i's output as its hidden states), else why not.

    Layer-wise calibration feeds block i's output to block i+1; on a list that is not such a chain (FPN
    levels of a detection head, stages with downsampling in between) it would calibrate every block on the
    wrong activations, so the caller falls back to whole-model calibration."""
    calls: List[Tuple[int, Any, Any]] = []
    index = {id(b): i for i, b in enumerate(layers)}

    def pre(mod, args, kwargs):
        h = hidden_input(tuple(args), dict(kwargs))
        extra = _strip_cache(tuple(args[1:]) if args else (), {k: v for k, v in kwargs.items() if k != "hidden_states"})
        calls.append([index[id(mod)], h, None, extra])

    def post(mod, _args, _kwargs, out):
        calls[-1][2] = out if isinstance(out, torch.Tensor) else hidden_output(out)

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in layers]
    handles += [b.register_forward_hook(post, with_kwargs=True) for b in layers]
    try:
        with eval_mode(model):
            call_batch(model, batch, model_device(model))
    finally:
        for h in handles:
            h.remove()
    order = [c[0] for c in calls]
    if order != list(range(len(layers))):
        return f"its blocks run in the order {order[:8]}{'...' if len(order) > 8 else ''}, not once each in turn"
    for (i, _, out, extra), (j, nxt, _, nxt_extra) in zip(calls, calls[1:]):
        if out is None or nxt is None or out.shape != nxt.shape or not (out is nxt or torch.equal(out, nxt)):
            return f"block {j} does not receive block {i}'s output as its input"
        if not _same(extra, nxt_extra):     # replayed blocks all get block 0's other arguments
            return (f"block {j} receives other arguments than block {i} (e.g. per-stage sizes or per-layer "
                    f"masks), and replayed blocks would all get block 0's")
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal call arguments: tensors by value, containers item by item, anything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and (a is b or torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:               # objects whose == is not a bool (arrays, exotic configs)
        return a is b


def hidden_input(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The hidden states a block receives: its first positional argument or `hidden_states=`."""
    h = args[0] if args else kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def hidden_output(out: Any) -> Optional[torch.Tensor]:
    """The hidden states a block returns (a tensor, or the first item of a tuple/ModelOutput), else None."""
    try:
        h = _block_output(out)
    except (TypeError, IndexError, KeyError):
        return None
    return h if isinstance(h, torch.Tensor) else None


def _is_cache(obj: Any) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(obj).__mro__ if c is not object)


def _strip_cache(args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """KV caches captured from the model's forward would grow on every replay; blocks replay without them."""
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> Tuple[tuple, dict]:
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _block_output(out: Any) -> torch.Tensor:
    """Blocks return a tensor (transformers 5) or a tuple/ModelOutput whose first item is the hidden states."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        return out[0]
    raise InputTypeError(f"cannot find hidden states in a block output of type {type(out).__name__}")


# ------------------------------------------------------------------------------------------------ buffer

class ActivationBuffer:
    """Captured (args, kwargs) of one block, one entry per calibration batch, kept off the compute device.

    offload="cpu": entries are CPU tensors in a list. offload="disk": each entry is a torch.save file in a
    temporary directory, loaded one at a time, so only one batch of activations is in memory."""

    def __init__(self, offload: str = "cpu", directory: Optional[str] = None):
        if offload not in ("cpu", "disk"):
            raise ConfigError(f"offload must be 'cpu' or 'disk', got {offload!r}")
        self.offload = offload
        self._items: List[Any] = []
        self._dir = tempfile.mkdtemp(prefix="prunekit-act-", dir=directory) if offload == "disk" else None
        self._serial = 0

    def __len__(self) -> int:
        return len(self._items)

    def _store(self, entry: Tuple[tuple, dict]) -> Any:
        entry = map_tensors(entry, lambda t: t.detach().to("cpu"))
        if self._dir is None:
            return entry
        self._serial += 1
        path = os.path.join(self._dir, f"{self._serial}.pt")
        torch.save(entry, path)
        return path

    def append(self, args: tuple, kwargs: dict) -> None:
        self._items.append(self._store((args, kwargs)))

    def get(self, i: int) -> Tuple[tuple, dict]:
        item = self._items[i]
        if self._dir is None:
            return item
        return torch.load(item, weights_only=False)

    def set_hidden(self, i: int, h: torch.Tensor) -> None:
        """Replace the hidden states of entry i (the next block's input), keeping its other arguments."""
        args, kwargs = self.get(i)
        old = self._items[i]
        self._items[i] = self._store(_with_hidden(args, kwargs, h))
        if self._dir is not None:
            os.remove(old)

    def nbytes(self) -> int:
        total = 0
        for i in range(len(self)):
            stack = [self.get(i)]
            while stack:
                x = stack.pop()
                if isinstance(x, torch.Tensor):
                    total += x.numel() * x.element_size()
                elif isinstance(x, (tuple, list)):
                    stack.extend(x)
                elif isinstance(x, dict):
                    stack.extend(x.values())
        return total

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._items = []

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[Dict[str, Any]], *,
                         offload: str = "cpu", offload_dir: Optional[str] = None) -> ActivationBuffer:
    """Run each batch through `model` until `block` is called; record the block's (args, kwargs).

    The forward is aborted by a private exception right at the block, so embeddings are the only layers
    computed. Any KV-cache objects are dropped from the recorded arguments."""
    buf = ActivationBuffer(offload, offload_dir)

    def hook(_mod, args, kwargs):
        buf.append(*_strip_cache(tuple(args), dict(kwargs)))
        raise _StopForward

    device = model_device(model)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with eval_mode(model):
            for i, batch in enumerate(batches):
                n = len(buf)
                try:
                    call_batch(model, batch, device)
                except _StopForward:
                    pass
                if len(buf) != n + 1:
                    raise GraphError(f"batch {i}: the forward pass finished without calling the first block "
                                     f"({type(block).__name__}); does the model use its block list?")
    except BaseException:
        buf.close()
        raise
    finally:
        handle.remove()
    return buf


@torch.no_grad()
def run_layerwise(model: nn.Module, batches: Sequence[Dict[str, Any]], observe: Observe, update: Update, *,
                  sequential: bool = True, offload: str = "cpu", offload_dir: Optional[str] = None,
                  device: Optional[torch.device] = None, blocks: Optional[Tuple[str, nn.ModuleList]] = None,
                  log: Optional[Callable[[str], None]] = None) -> Tuple[str, nn.ModuleList]:
    """Visit every block with the calibration activations that reach it.

    For block i: `handles = observe(i, name, block)`, run all batches through the block, remove the handles,
    `update(i, name, block)` (e.g. prune it), then the block outputs become block i+1's inputs -- recomputed
    after `update` when `sequential=True`, the pre-update outputs otherwise.
    device: where each block runs (it is moved there and back); default: where the block's weights are.
    Returns (name, blocks) as found by `find_blocks`.
    """
    prefix, layers = blocks if blocks is not None else find_blocks(model)
    buf = capture_block_inputs(model, layers[0], batches, offload=offload, offload_dir=offload_dir)
    try:
        with eval_mode(model):
            for i, block in enumerate(layers):
                name = f"{prefix}.{i}" if prefix else str(i)
                home = model_device(block)
                run_on = torch.device(device) if device is not None else home
                if run_on != home:
                    block.to(run_on)
                t0 = time.perf_counter()
                handles = observe(i, name, block)
                try:                                        # non-sequential: dense outputs feed block i+1
                    _run_block(block, buf, run_on, write_back=not sequential)
                finally:
                    for h in handles or ():
                        h.remove()
                update(i, name, block)
                if sequential:                              # the updated block's outputs feed block i+1
                    _run_block(block, buf, run_on, write_back=True)
                if run_on != home:
                    block.to(home)
                if log:
                    log(f"block {name}: {time.perf_counter() - t0:.1f}s")
    finally:
        buf.close()
    return prefix, layers


def _run_block(block: nn.Module, buf: ActivationBuffer, device: torch.device, write_back: bool) -> None:
    """Run every buffered batch through `block`; with write_back, its output replaces that entry's hidden
    states right away (entry j is not read again in this pass), so only one buffer is ever alive."""
    for j in range(len(buf)):
        args, kwargs = map_tensors(buf.get(j), lambda t: t.to(device))
        out = _block_output(block(*args, **kwargs))
        if write_back:
            buf.set_hidden(j, out.detach())


@torch.no_grad()
def run_whole(model: nn.Module, batches: Sequence[Dict[str, Any]], observe: Observe, update: Update) -> None:
    """Whole-model pipeline: `observe(-1, "", model)` attaches hooks anywhere, every batch runs through the full
    model once, the hooks are removed, then `update(-1, "", model)`. Simple and exact for any architecture,
    but all statistics are alive at once and nothing downstream sees the pruned layers' outputs."""
    device = model_device(model)
    with eval_mode(model):
        handles = observe(-1, "", model)
        try:
            for batch in batches:
                call_batch(model, batch, device)
        finally:
            for h in handles or ():
                h.remove()
        update(-1, "", model)

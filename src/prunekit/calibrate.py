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
import inspect
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["CalibrationDataError", "as_batches", "find_blocks", "ActivationBuffer", "capture_block_inputs",
           "run_layerwise", "run_whole", "measure_peak_memory", "peak_rss_bytes"]

Observe = Callable[[int, str, nn.Module], List[Any]]   # returns hook handles (anything with .remove())
Update = Callable[[int, str, nn.Module], None]


class CalibrationDataError(ValueError):
    """Calibration data is missing, empty, or has the wrong type/shape. Raised before any weight changes."""


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass right after the first block's inputs are known."""


# ------------------------------------------------------------------------------------------------ data

POSITIONAL = "__positional__"     # key of a batch whose inputs are passed positionally: model(*batch[POSITIONAL])


def as_batches(data: Any, *, what: str = "data", model: Optional[nn.Module] = None) -> List[Dict[str, Any]]:
    """Check calibration data and return it as a list of forward-kwargs dicts.

    Accepts an iterable (list, generator, DataLoader, ...) whose items are an integer `input_ids` tensor of
    shape (B, T), a dict of forward keyword arguments (`{"input_ids": ..., "attention_mask": ...}`), or -- for
    a model whose forward does not start with `input_ids` (a CNN, any plain module) -- a float input tensor
    passed positionally, or an `(inputs, targets)` pair whose targets are ignored.
    Raises CalibrationDataError naming the offending batch; the iterable is consumed once.
    """
    if data is None:
        raise CalibrationDataError(f"{what} is required: pass calibration batches, e.g. "
                                   f"data=[tokenizer(text, return_tensors='pt').input_ids]")
    if isinstance(data, torch.Tensor):
        raise CalibrationDataError(f"{what} must be an iterable of batches, got a single tensor of shape "
                                   f"{tuple(data.shape)}; wrap it in a list: {what}=[input_ids]")
    if isinstance(data, (str, bytes, dict)):
        raise CalibrationDataError(f"{what} must be an iterable of batches (tensors or dicts), got a single "
                                   f"{type(data).__name__}; tokenize text first and wrap one batch in a list")
    try:
        items = list(data)
    except TypeError:
        raise CalibrationDataError(f"{what} must be an iterable of batches, got {type(data).__name__}") from None
    if not items:
        raise CalibrationDataError(f"{what} is empty: pass at least one calibration batch")
    positional = model is not None and not _takes_input_ids(model)
    return [_as_kwargs(b, f"{what}[{i}]", positional) for i, b in enumerate(items)]


def forward_parameters(model: nn.Module) -> Optional[List[str]]:
    """Names of `model.forward`'s parameters in order, or None when its signature cannot be read."""
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None


def _takes_input_ids(model: nn.Module) -> bool:
    """Whether the forward's first parameter is `input_ids` (a language model) -- then a tensor batch must be
    token ids. Otherwise tensors are positional inputs. Unreadable signatures count as language models."""
    params = forward_parameters(model)
    return params is None or (bool(params) and params[0] == "input_ids")


def _as_kwargs(batch: Any, where: str, positional: bool = False) -> Dict[str, Any]:
    if positional and isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        batch = batch[0]                                         # (inputs, targets): calibration needs inputs only
    if isinstance(batch, torch.Tensor):
        if positional:
            if batch.dim() == 0 or batch.numel() == 0:
                raise CalibrationDataError(f"{where} is an empty or 0-d tensor {tuple(batch.shape)}; expected a "
                                           f"batch of model inputs with the batch dimension first")
            return {POSITIONAL: (batch,)}
        _check_ids(batch, where)
        return {"input_ids": batch}
    if isinstance(batch, dict):
        if not batch or not any(isinstance(v, torch.Tensor) for v in batch.values()):
            raise CalibrationDataError(f"{where} is a dict without tensors; expected forward kwargs such as "
                                       f"{{'input_ids': LongTensor (B, T), 'attention_mask': ...}}")
        if not all(isinstance(k, str) for k in batch):
            raise CalibrationDataError(f"{where} has non-string keys {list(batch)}; keys must be forward argument names")
        if "input_ids" in batch:
            _check_ids(batch["input_ids"], f"{where}['input_ids']")
        if "inputs_embeds" in batch:
            e = batch["inputs_embeds"]
            if not isinstance(e, torch.Tensor) or e.dim() != 3 or not e.is_floating_point() or e.numel() == 0:
                raise CalibrationDataError(f"{where}['inputs_embeds'] must be a non-empty float tensor (B, T, hidden)")
        return dict(batch)
    raise CalibrationDataError(f"{where} has type {type(batch).__name__}; each batch must be an input_ids "
                               f"LongTensor of shape (B, T) or a dict of forward keyword arguments")


def _check_ids(t: Any, where: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise CalibrationDataError(f"{where} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise CalibrationDataError(f"{where} must hold integer token ids (torch.long), got dtype {t.dtype}; "
                                   f"tokenize the text first")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise CalibrationDataError(f"{where} must have shape (batch, seq_len) with both > 0, got {tuple(t.shape)}"
                                   + ("; add a batch dim with ids.unsqueeze(0)" if t.dim() == 1 else ""))


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
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks with parameters; "
                         f"use the whole-model pipeline (pipeline='whole') instead")
    return best


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):          # namedtuple
        return type(obj)(*(_map_tensors(x, fn) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _is_cache(obj: Any) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(obj).__mro__ if c is not object)


def _strip_cache(args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """KV caches captured from the model's forward would grow on every replay; blocks replay without them."""
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


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
    raise TypeError(f"cannot find hidden states in a block output of type {type(out).__name__}")


# ------------------------------------------------------------------------------------------------ buffer

class ActivationBuffer:
    """Captured (args, kwargs) of one block, one entry per calibration batch, kept off the compute device.

    offload="cpu": entries are CPU tensors in a list. offload="disk": each entry is a torch.save file in a
    temporary directory, loaded one at a time, so only one batch of activations is in memory."""

    def __init__(self, offload: str = "cpu", directory: Optional[str] = None):
        if offload not in ("cpu", "disk"):
            raise ValueError(f"offload must be 'cpu' or 'disk', got {offload!r}")
        self.offload = offload
        self._items: List[Any] = []
        self._dir = tempfile.mkdtemp(prefix="prunekit-act-", dir=directory) if offload == "disk" else None
        self._serial = 0

    def __len__(self) -> int:
        return len(self._items)

    def _store(self, entry: Tuple[tuple, dict]) -> Any:
        entry = _map_tensors(entry, lambda t: t.detach().to("cpu"))
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


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def call_batch(model: nn.Module, batch: Dict[str, Any], device: torch.device):
    """Run `model` on one batch from `as_batches` (keyword or positional inputs) moved to `device`."""
    if POSITIONAL in batch:
        return model(*_map_tensors(batch[POSITIONAL], lambda t: t.to(device)))
    return model(**_forward_kwargs(model, batch, device))


def _forward_kwargs(model: nn.Module, batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    kw = _map_tensors(batch, lambda t: t.to(device))
    if "use_cache" in (forward_parameters(model) or ()) and "use_cache" not in kw:
        kw["use_cache"] = False                                     # no KV cache while calibrating
    return kw


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Calibrate with dropout off; restore the caller's train/eval state afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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

    device = _model_device(model)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _eval_mode(model):
            for i, batch in enumerate(batches):
                n = len(buf)
                try:
                    call_batch(model, batch, device)
                except _StopForward:
                    pass
                if len(buf) != n + 1:
                    raise RuntimeError(f"batch {i}: the forward pass finished without calling the first block "
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
        with _eval_mode(model):
            for i, block in enumerate(layers):
                name = f"{prefix}.{i}" if prefix else str(i)
                home = _model_device(block)
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
        args, kwargs = _map_tensors(buf.get(j), lambda t: t.to(device))
        out = _block_output(block(*args, **kwargs))
        if write_back:
            buf.set_hidden(j, out.detach())


@torch.no_grad()
def run_whole(model: nn.Module, batches: Sequence[Dict[str, Any]], observe: Observe, update: Update) -> None:
    """Whole-model pipeline: `observe(-1, "", model)` attaches hooks anywhere, every batch runs through the full
    model once, the hooks are removed, then `update(-1, "", model)`. Simple and exact for any architecture,
    but all statistics are alive at once and nothing downstream sees the pruned layers' outputs."""
    device = _model_device(model)
    with _eval_mode(model):
        handles = observe(-1, "", model)
        try:
            for batch in batches:
                call_batch(model, batch, device)
        finally:
            for h in handles or ():
                h.remove()
        update(-1, "", model)


# ------------------------------------------------------------------------------------------------ memory

def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss; Linux reports KiB, macOS bytes)."""
    import resource
    import sys
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _current_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def measure_peak_memory(fn: Callable, *args, interval: float = 0.005, **kwargs) -> Tuple[Any, Dict[str, int]]:
    """Run fn(*args, **kwargs) and report how far memory rose above where it started.

    CPU: a sampling thread polls the resident set size (/proc/self/statm) every `interval` seconds; torch's
    CPU allocations bypass tracemalloc, so RSS is the honest measure. CUDA: torch.cuda.max_memory_allocated.
    Returns (fn's result, {"rss_start", "rss_peak", "rss_delta", "cuda_peak"}) in bytes. For clean numbers
    run each measured mode in a fresh process: glibc keeps freed heap pages, so a second run in the same
    process can reuse memory and look smaller.
    """
    start = _current_rss_bytes()
    peak = [start or 0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            cur = _current_rss_bytes()
            if cur is not None and cur > peak[0]:
                peak[0] = cur
            stop.wait(interval)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_start = torch.cuda.memory_allocated()
    thread = threading.Thread(target=sample, daemon=True)
    if start is not None:
        thread.start()
    try:
        result = fn(*args, **kwargs)
    finally:
        stop.set()
        if start is not None:
            thread.join()
    if start is None:                                               # no /proc: fall back to ru_maxrss
        start, peak[0] = 0, peak_rss_bytes()
    report = {"rss_start": int(start), "rss_peak": int(peak[0]), "rss_delta": int(peak[0] - start),
              "cuda_peak": int(torch.cuda.max_memory_allocated() - cuda_start) if cuda else 0}
    return result, report

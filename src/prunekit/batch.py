"""How prunekit feeds a model: every batch form, device moves, eval mode, progress bars, process rank.

One place for what calibration, recovery, evaluation, latency and importance scoring all do to a batch:

    split_batch(b)         (inputs, targets) of a training/eval batch; targets None when the batch is inputs only
    call_model(m, x)       dict -> m(**x), tuple or list of tensors -> m(*x), anything else -> m(x)
    as_batches(data)       calibration data checked and normalized to forward-kwargs dicts; call_batch runs one
    map_tensors / to_device / model_device / batch_size_of / take / repeat_to_batch   structure-keeping helpers
    eval_mode(m)           context manager: dropout off inside, the caller's train/eval state restored after
    progress(...)          a tqdm bar that stays silent when quiet or when stderr is not a terminal
    rank_world()           (rank, world size) of this process in torch.distributed, (0, 1) outside a job
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from prunekit.errors import CalibrationDataError, ConfigError, InputTypeError


# ------------------------------------------------------------------------------------------------ process
def progress(iterable: Optional[Iterable] = None, desc: str = "", quiet: bool = False, *,
             total: Optional[int] = None, initial: int = 0, leave: bool = False):
    """tqdm over `iterable` (or a manual bar of `total` steps), disabled when quiet or stderr is no terminal."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave,
                disable=quiet or not sys.stderr.isatty())


def rank_world() -> Tuple[int, int]:
    """(rank, world size) in the default torch.distributed group; (0, 1) when no group is initialized."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def eval_mode(*models: Optional[nn.Module]):
    """Run a block with the models in eval mode (dropout off); restore each one's train/eval state after."""
    states = [(m, m.training) for m in models if m is not None]
    for m, _ in states:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in states:
            m.train(was_training)


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
    if positional and isinstance(batch, tuple) and len(batch) != 2 and _holds_tensor(batch):
        return {POSITIONAL: batch}                               # positional inputs model(*batch), e.g. ([img],)
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


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(o) for o in obj)
    return isinstance(obj, Mapping) and any(_holds_tensor(v) for v in obj.values())


def _check_ids(t: Any, where: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise CalibrationDataError(f"{where} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise CalibrationDataError(f"{where} must hold integer token ids (torch.long), got dtype {t.dtype}; "
                                   f"tokenize the text first")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise CalibrationDataError(f"{where} must have shape (batch, seq_len) with both > 0, got {tuple(t.shape)}"
                                   + ("; add a batch dim with ids.unsqueeze(0)" if t.dim() == 1 else ""))


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`fn` applied to every tensor in a (nested) tensor / tuple / namedtuple / list / dict; the rest kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):          # namedtuple
        return type(obj)(*(map_tensors(x, fn) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device) -> Any:
    """Every tensor in `obj` moved to `device` (structure kept; non-tensors untouched)."""
    return map_tensors(obj, lambda t: t.to(device))


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (inputs follow it); CPU for models without parameters
    (e.g. dynamically quantized ones)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def call_batch(model: nn.Module, batch: Dict[str, Any], device: torch.device):
    """Run `model` on one batch from `as_batches` (keyword or positional inputs) moved to `device`."""
    if POSITIONAL in batch:
        return model(*to_device(batch[POSITIONAL], device))
    return model(**forward_kwargs(model, batch, device))


def forward_kwargs(model: nn.Module, batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """A keyword batch moved to `device`, with `use_cache=False` when the forward takes it (no KV cache
    while calibrating)."""
    kw = to_device(batch, device)
    if "use_cache" in (forward_parameters(model) or ()) and "use_cache" not in kw:
        kw["use_cache"] = False
    return kw


def call_model(model: nn.Module, inputs: Any):
    """Call a model the way its inputs ask: a dict (Hugging Face tokenizer output) as keyword arguments, a
    tuple -- or a list of tensors -- as positional arguments, anything else (a tensor, a list of texts) as
    the single argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple) or (isinstance(inputs, list) and inputs
                                     and all(isinstance(x, torch.Tensor) for x in inputs)):
        return model(*inputs)
    return model(inputs)


def split_batch(batch: Any) -> Tuple[Any, Any]:
    """A batch is `(inputs, targets)` (a tuple or list of two) or the inputs alone (targets None).

    A list of two strings is inputs (two texts), not an (inputs, targets) pair."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not all(isinstance(b, str) for b in batch):
        return batch[0], batch[1]
    return batch, None


def batch_size_of(obj: Any) -> int:
    """Number of examples in a batch: first dimension of the first tensor found (through dicts, tuples and
    lists of tensors); the length of a list of texts or numbers."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.dim() > 0 else 1
    if isinstance(obj, Mapping):
        for v in obj.values():
            if isinstance(v, (torch.Tensor, list, tuple, Mapping)):
                return batch_size_of(v)
    elif isinstance(obj, (list, tuple)) and obj:
        if isinstance(obj[0], (torch.Tensor, list, tuple, Mapping)):
            return batch_size_of(obj[0])
        return len(obj)
    raise InputTypeError(f"cannot tell the batch size of a {type(obj).__name__}; give tensors with the batch "
                    f"dimension first (or a dict/tuple of them)")


def take(obj: Any, lo: int, hi: int) -> Any:
    """Examples lo:hi of a batch (same structure)."""
    if isinstance(obj, (torch.Tensor, list)):
        return obj[lo:hi]
    if isinstance(obj, tuple):
        return tuple(take(o, lo, hi) for o in obj)
    if isinstance(obj, Mapping):
        return {k: take(v, lo, hi) if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in obj.items()}
    if obj is None:
        return None
    raise InputTypeError(f"cannot slice a batch of type {type(obj).__name__}; give tensors, lists, or a "
                    f"dict/tuple of them")


def repeat_to_batch(inputs: Any, batch_size: int) -> Any:
    """`inputs` resized to `batch_size` rows along dim 0 (rows repeated cyclically): one example input is
    enough to time any batch size. A callable `inputs(batch_size)` is called instead."""
    if callable(inputs):
        return inputs(batch_size)
    if not isinstance(inputs, (torch.Tensor, Mapping, list, tuple)):
        raise InputTypeError(f"inputs must be a tensor, a dict/tuple of tensors, or a callable batch_size -> inputs; "
                        f"got {type(inputs).__name__}")

    def grow(t):
        reps = -(-batch_size // t.shape[0])
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size].contiguous()
    return map_tensors(inputs, grow)


def check_example_inputs(model: nn.Module, example_inputs: Any, what: str = "example_inputs") -> None:
    """Run the dense model once on `example_inputs` (no grad, eval mode); a failure becomes a ConfigError that
    names `what` and the innermost module that rejected the inputs (wrong shape, rank, dtype, device, batch 0)."""
    empty = []
    map_tensors(example_inputs, lambda t: empty.append(tuple(t.shape)) if t.dim() and t.shape[0] == 0 else None)
    if empty:
        raise ConfigError(f"{what} has batch size 0 (a tensor of shape {empty[0]}); pass at least one example")
    stack: List[str] = []

    def enter(name):
        def hook(mod, args):
            stack.append(name)
        return hook

    def leave(mod, args, out):
        if stack:
            stack.pop()

    hooks = []
    for name, m in model.named_modules():
        hooks += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, example_inputs)
    except Exception as e:           # noqa: BLE001 - any failure of the user's inputs is reported, with its cause
        where = stack[-1] if stack else ""
        mod = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else "the model's forward"
        cause = " ".join(str(e).split())[:300]
        raise ConfigError(f"{what} do not fit the model: {mod} rejected them ({type(e).__name__}: {cause}); pass "
                          f"inputs of the shape, dtype and device the model expects") from e
    finally:
        for h in hooks:
            h.remove()

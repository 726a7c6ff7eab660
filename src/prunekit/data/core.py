"""The dataset registry and `Batches`: what every packaged dataset (images.py, text.py, lm.py) is built on."""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from prunekit.errors import DataError

SPLITS = ("train", "test")


def cache_dir() -> Path:
    """Where prunekit caches derived files (unpacked packages, trained weights).

    `PRUNEKIT_CACHE` overrides the default ~/.cache/prunekit (tests point it at a temp dir)."""
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


# --------------------------------------------------------------------------------------------- batches


class Batches(Sequence):
    """A fixed-order, re-iterable sequence of batches cut from whole-dataset columns.

    `inputs` and `targets` are tensors (first dim = examples), lists, or tuples of those (e.g. text pairs).
    Iterating twice yields the same batches, so calibration and evaluation are repeatable; `len()` is the
    number of batches. `targets=None` makes each batch the inputs alone (label-free data for distillation).
    """

    def __init__(self, inputs: Any, targets: Any = None, batch_size: int = 64):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size
        self.num_examples = _num_examples(inputs)
        if targets is not None and _num_examples(targets) != self.num_examples:
            raise DataError(f"inputs have {self.num_examples} examples but targets have {_num_examples(targets)}")

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"batch index {i} out of range for {len(self)} batches")
        lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, self.num_examples)
        x = _take(self.inputs, lo, hi)
        return x if self.targets is None else (x, _take(self.targets, lo, hi))

    def __iter__(self) -> Iterator:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"Batches({self.num_examples} examples, batch_size={self.batch_size}, labelled={self.targets is not None})"


def _num_examples(col) -> int:
    if isinstance(col, tuple):
        return _num_examples(col[0])
    return int(col.shape[0]) if isinstance(col, torch.Tensor) else len(col)


def _take(col, lo: int, hi: int):
    if isinstance(col, tuple):
        return tuple(_take(c, lo, hi) for c in col)
    return col[lo:hi]


def limit_rows(col, n: Optional[int]):
    return col if n is None else _take(col, 0, n)


# --------------------------------------------------------------------------------------------- registry

_DATASETS: Dict[str, Callable[..., Batches]] = {}


def register_dataset(name: str):
    """Decorator: make `fn(split, batch_size, limit, **kw) -> Batches` loadable as `load(name)`."""
    def deco(fn):
        _DATASETS[name] = fn
        return fn
    return deco


def available() -> List[str]:
    """Names accepted by `load` (besides `module:function` specs)."""
    return sorted(_DATASETS)


def takes_tokenizer(spec: str) -> bool:
    """Whether the built-in dataset `spec` cuts token windows with a `tokenizer=` argument (LM text data)."""
    fn = _DATASETS.get(spec)
    return fn is not None and "tokenizer" in inspect.signature(fn).parameters


def load(spec: str, split: str = "train", batch_size: Optional[int] = None, limit: Optional[int] = None, **kwargs):
    """Load a dataset by built-in name or `module:function` spec; see the module docstring for batch types.

    batch_size: examples per batch (None: the dataset's default, 64 for images, 16 for texts).
    limit: keep only the first `limit` examples of the split (fast tests, small calibration sets)."""
    if not isinstance(spec, str):
        raise DataError(f"dataset spec must be a string (a name from {available()} or 'module:function'), got {spec!r}")
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    if spec in _DATASETS:
        return _DATASETS[spec](split=split, limit=limit, **kwargs)
    if ":" in spec:
        return resolve_callable(spec, "dataset")(split=split, limit=limit, **kwargs)
    close = difflib.get_close_matches(spec, available(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DataError(f"unknown dataset '{spec}'.{hint} Known: {available()}, or give 'package.module:function'.")


def resolve_callable(spec: str, what: str) -> Callable:
    """Import `package.module:attr` and return the attribute; errors say which half failed."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise DataError(f"{what} spec '{spec}' must look like 'package.module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise DataError(f"{what} spec '{spec}': cannot import module '{mod_name}' ({e}). "
                        f"Is it installed / on PYTHONPATH?") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"{what} spec '{spec}': module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DataError(f"{what} spec '{spec}' resolves to a non-callable {type(obj).__name__}")
    return obj


def every_fifth_is_test(n: int, split: str) -> np.ndarray:
    """Deterministic split for datasets that ship no split: example i is test iff i % 5 == 4 (80/20)."""
    idx = np.arange(n)
    return idx[idx % 5 == 4] if split == "test" else idx[idx % 5 != 4]


# --------------------------------------------------------------------------------------------- Jane Austen


def interleave(lists: List[list]) -> Iterator[list]:
    """Round-robin rows from each list: [[a0, b0, ...], [a1, b1, ...], ...] (shorter lists drop out)."""
    for i in range(max(map(len, lists))):
        yield [lst[i] for lst in lists if i < len(lst)]

"""Image datasets: Fashion-MNIST (Debian dataset-fashion-mnist) and scikit-learn's digits."""
from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from prunekit.data.core import Batches, every_fifth_is_test, limit_rows, register_dataset
from prunekit.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Per-pixel mean/std of the Fashion-MNIST training images (after /255); inputs are standardized with them.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@functools.lru_cache(maxsize=2)
def _fashion_mnist_arrays(split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    img_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lbl_path.exists():
        raise DataError(f"Fashion-MNIST not found at {FASHION_MNIST_DIR} (missing {img_path.name} or "
                        f"{lbl_path.name}). Install the Debian package: "
                        f"`sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist`")
    images = _read_idx(img_path, 16).reshape(-1, 1, 28, 28)          # [N, 1, 28, 28] uint8
    labels = _read_idx(lbl_path, 8).astype(np.int64)                 # [N]
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels; files corrupt?")
    x = (torch.from_numpy(images.copy()).float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x, torch.from_numpy(labels)


@register_dataset("fashion-mnist")
def fashion_mnist(split: str = "train", batch_size: int = 64, limit: Optional[int] = None) -> Batches:
    """60k train / 10k test 28x28 grayscale clothing images, 10 classes (FASHION_MNIST_CLASSES)."""
    x, y = _fashion_mnist_arrays(split)
    return Batches(limit_rows(x, limit), limit_rows(y, limit), batch_size)


# --------------------------------------------------------------------------------------------- sklearn digits


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("the 'digits' dataset needs scikit-learn: `pip install scikit-learn`") from e
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)   # [1797, 1, 8, 8] in [0, 1]
    return x, torch.from_numpy(d.target.astype(np.int64))


@register_dataset("digits")
def digits(split: str = "train", batch_size: int = 64, limit: Optional[int] = None) -> Batches:
    """1797 8x8 handwritten digits shipped with scikit-learn; deterministic 80/20 split (every 5th is test)."""
    x, y = _digits_arrays()
    keep = torch.from_numpy(every_fifth_is_test(len(y), split))
    return Batches(limit_rows(x[keep], limit), limit_rows(y[keep], limit), batch_size)

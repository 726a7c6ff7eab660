"""Real datasets for calibration, recovery and evaluation, taken only from installed packages.

Nothing here downloads from a dataset hub: every dataset comes from a Debian package or from data that a
Python package ships. That keeps runs offline and reproducible.

`load(spec, split=..., batch_size=...)` returns a `Batches` object: a re-iterable, indexable sequence of
batches with a fixed order (shuffling, when wanted, is done by the consumer, e.g. `recover`).

Built-in names and the batch each one yields (B = batch size):

=================  ============================================================================  ==========
name               batch                                                                         source
=================  ============================================================================  ==========
fashion-mnist      (x float32 [B, 1, 28, 28] normalized, y int64 [B] in 0..9)                    Debian dataset-fashion-mnist
digits             (x float32 [B, 1, 8, 8] in [0, 1], y int64 [B] in 0..9)                        sklearn
austen             (texts list[str] of B paragraphs, y int64 [B] book index, see AUSTEN_BOOKS)    Debian r-cran-janeaustenr
polarity           (texts list[str] of B sentences, y int64 [B]: 0 neg, 1 pos)                    gensim test data
lee                texts list[str] of B news documents (inputs only, no labels)                 gensim test data
lee-sim            ((texts_a list[str], texts_b list[str]), score float32 [B] in [0, 1])          gensim test data
=================  ============================================================================  ==========

Any other spec of the form ``"package.module:function"`` is imported and called as
``function(split=split, batch_size=batch_size, limit=limit, **kwargs)``; it must return an iterable of batches.
"""
from __future__ import annotations

import difflib
import functools
import gzip
import importlib
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from prunekit.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Per-pixel mean/std of the Fashion-MNIST training images (after /255); inputs are standardized with them.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
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


def _limit(col, n: Optional[int]):
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


def _every_fifth_is_test(n: int, split: str) -> np.ndarray:
    """Deterministic split for datasets that ship no split: example i is test iff i % 5 == 4 (80/20)."""
    idx = np.arange(n)
    return idx[idx % 5 == 4] if split == "test" else idx[idx % 5 != 4]


# --------------------------------------------------------------------------------------------- Fashion-MNIST


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
    return Batches(_limit(x, limit), _limit(y, limit), batch_size)


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
    keep = torch.from_numpy(_every_fifth_is_test(len(y), split))
    return Batches(_limit(x[keep], limit), _limit(y[keep], limit), batch_size)


# --------------------------------------------------------------------------------------------- Jane Austen


def _austen_data_dir() -> Path:
    return cache_dir() / "debian" / "r-cran-janeaustenr" / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"


def ensure_janeaustenr() -> Path:
    """Unpack Debian's r-cran-janeaustenr into the cache (no root needed) and return its R data dir.

    `apt-get download` fetches the .deb into a temp dir and `dpkg-deb -x` unpacks it; the unpacked tree is
    moved into place with os.replace so a crash never leaves a half-unpacked cache behind."""
    data = _austen_data_dir()
    if (data / "Rdata.rdb").exists():
        return data
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DataError(f"the 'austen' dataset is unpacked from the Debian package r-cran-janeaustenr, but "
                            f"`{tool}` is not available on this system. On Debian/Ubuntu run "
                            f"`apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb "
                            f"{data.parents[5]}`")
    root = data.parents[5]                                   # .../debian/r-cran-janeaustenr
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        dl = subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        if dl.returncode != 0 or not debs:
            raise DataError(f"`apt-get download r-cran-janeaustenr` failed (exit {dl.returncode}): "
                            f"{dl.stderr.strip()[-400:]}. Try `sudo apt-get update` first.")
        unpacked = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, capture_output=True)
        if root.exists():
            shutil.rmtree(root)
        os.replace(unpacked, root)
    if not (data / "Rdata.rdb").exists():
        raise DataError(f"r-cran-janeaustenr unpacked to {root} but has no {data / 'Rdata.rdb'}; package layout changed?")
    return data


@functools.lru_cache(maxsize=1)
def austen_books() -> Dict[str, List[str]]:
    """The six novels as {book name: list of text lines}, read from R's lazy-load database with `rdata`.

    Rdata.rdx (gzip) maps each object to (offset, length) in Rdata.rdb; each record is a 4-byte length
    header followed by a zlib stream holding an RDS-serialized character vector."""
    import warnings
    try:
        import rdata
    except ImportError as e:
        raise DataError("the 'austen' dataset needs the 'rdata' package: `pip install rdata`") from e
    d = ensure_janeaustenr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # rdata: "Unknown file type: assumed RDS"
        with gzip.open(d / "Rdata.rdx") as f:
            index = rdata.conversion.convert(rdata.parser.parse_data(f.read()))
        rdb = (d / "Rdata.rdb").read_bytes()
        books = {}
        for name, (off, n) in index["variables"].items():
            raw = zlib.decompress(rdb[int(off) + 4:int(off) + int(n)])
            books[str(name)] = [str(s) for s in rdata.conversion.convert(rdata.parser.parse_data(raw))]
    missing = set(AUSTEN_BOOKS) - set(books)
    if missing:
        raise DataError(f"janeaustenr data lacks books {sorted(missing)}; found {sorted(books)}")
    return books


def _paragraphs(lines: List[str], min_chars: int) -> List[str]:
    """Join wrapped lines into paragraphs (blank-line separated), dropping short ones (titles, headings)."""
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    return [p for p in paras if len(p) >= min_chars]


@register_dataset("austen")
def austen(split: str = "train", batch_size: int = 16, limit: Optional[int] = None, min_chars: int = 80) -> Batches:
    """Paragraphs of Jane Austen's six novels labelled by book (index into AUSTEN_BOOKS), interleaved so any
    prefix (`limit`) mixes all books; every 5th paragraph per book is test."""
    books = austen_books()
    per_book = []
    for label, name in enumerate(AUSTEN_BOOKS):
        paras = _paragraphs(books[name], min_chars)
        per_book.append([(p, label) for i, p in enumerate(paras) if (i % 5 == 4) == (split == "test")])
    rows = [r for group in _interleave(per_book) for r in group]
    texts, labels = [r[0] for r in rows], torch.tensor([r[1] for r in rows], dtype=torch.int64)
    return Batches(_limit(texts, limit), _limit(labels, limit), batch_size)


def _interleave(lists: List[list]) -> Iterator[list]:
    """Round-robin rows from each list: [[a0, b0, ...], [a1, b1, ...], ...] (shorter lists drop out)."""
    for i in range(max(map(len, lists))):
        yield [lst[i] for lst in lists if i < len(lst)]


# --------------------------------------------------------------------------------------------- gensim test data


def _gensim_file(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as e:
        raise DataError(f"dataset file {name} ships with gensim's test data: `pip install gensim`") from e
    path = Path(datapath(name))
    if not path.exists():
        raise DataError(f"gensim is installed but its test data file {path} is missing; reinstall gensim")
    return path


def _gensim_lines(name: str) -> List[str]:
    return [ln.strip() for ln in _gensim_file(name).read_text(encoding="latin-1").splitlines() if ln.strip()]


@register_dataset("lee")
def lee(split: str = "train", batch_size: int = 16, limit: Optional[int] = None) -> Batches:
    """Lee news corpus: train = 300 background documents (lee_background.cor), test = the 50 documents
    of lee.cor that humans rated for similarity. Inputs only (calibration / language-model data)."""
    docs = _gensim_lines("lee_background.cor" if split == "train" else "lee.cor")
    return Batches(_limit(docs, limit), None, batch_size)


def lee_similarity() -> Tuple[List[str], torch.Tensor]:
    """The 50 lee.cor documents and their human similarity matrix float32 [50, 50] (symmetric, 1 on the
    diagonal); the file holds the upper triangle."""
    docs = _gensim_lines("lee.cor")
    rows = [[float(v) for v in ln.split()] for ln in _gensim_lines("similarities0-1.txt")]
    sim = torch.tensor(rows, dtype=torch.float32)                     # [50, 50] upper triangular
    if sim.shape != (len(docs), len(docs)):
        raise DataError(f"similarities0-1.txt is {tuple(sim.shape)}, expected ({len(docs)}, {len(docs)})")
    return docs, torch.triu(sim) + torch.triu(sim, 1).T


@register_dataset("lee-sim")
def lee_sim(split: str = "test", batch_size: int = 64, limit: Optional[int] = None) -> Batches:
    """All 1225 document pairs (i < j) of lee.cor with their human similarity; for embedding-model eval.
    There is one split only, returned for both 'train' and 'test'."""
    docs, sim = lee_similarity()
    i, j = torch.triu_indices(len(docs), len(docs), offset=1)         # [2, 1225]
    a, b = [docs[k] for k in i.tolist()], [docs[k] for k in j.tolist()]
    return Batches((_limit(a, limit), _limit(b, limit)), _limit(sim[i, j], limit), batch_size)


@register_dataset("polarity")
def polarity(split: str = "train", batch_size: int = 16, limit: Optional[int] = None) -> Batches:
    """200 movie-review sentences labelled `__label__neg` (0) / `__label__pos` (1) from
    pang_lee_polarity.cor; deterministic 80/20 split (every 5th sentence is test). The file lists all
    negatives first, so rows are interleaved neg/pos to keep any prefix (`limit`) balanced."""
    by_label: List[List[Tuple[str, int]]] = [[], []]
    for ln in _gensim_lines("pang_lee_polarity.cor"):
        tag, _, text = ln.partition(" ")
        if tag not in ("__label__neg", "__label__pos"):
            raise DataError(f"pang_lee_polarity.cor: unexpected label '{tag}' in line {ln[:60]!r}")
        by_label[int(tag == "__label__pos")].append((text, int(tag == "__label__pos")))
    rows = [r for group in _interleave(by_label) for r in group]
    texts, labels = [r[0] for r in rows], [r[1] for r in rows]
    keep = _every_fifth_is_test(len(texts), split)
    texts = [texts[k] for k in keep]
    y = torch.tensor(labels, dtype=torch.int64)[torch.from_numpy(keep)]
    return Batches(_limit(texts, limit), _limit(y, limit), batch_size)

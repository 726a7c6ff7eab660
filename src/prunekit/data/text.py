"""Text datasets: Jane Austen's novels (Debian r-cran-janeaustenr) and gensim's bundled test corpora."""
from __future__ import annotations

import functools
import gzip
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from prunekit.data.core import Batches, cache_dir, every_fifth_is_test, interleave, limit_rows, register_dataset
from prunekit.errors import DataError

AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


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


def paragraphs(lines: List[str], min_chars: int) -> List[str]:
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
        paras = paragraphs(books[name], min_chars)
        per_book.append([(p, label) for i, p in enumerate(paras) if (i % 5 == 4) == (split == "test")])
    rows = [r for group in interleave(per_book) for r in group]
    texts, labels = [r[0] for r in rows], torch.tensor([r[1] for r in rows], dtype=torch.int64)
    return Batches(limit_rows(texts, limit), limit_rows(labels, limit), batch_size)




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
    return Batches(limit_rows(docs, limit), None, batch_size)


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
    return Batches((limit_rows(a, limit), limit_rows(b, limit)), limit_rows(sim[i, j], limit), batch_size)


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
    rows = [r for group in interleave(by_label) for r in group]
    texts, labels = [r[0] for r in rows], [r[1] for r in rows]
    keep = every_fifth_is_test(len(texts), split)
    texts = [texts[k] for k in keep]
    y = torch.tensor(labels, dtype=torch.int64)[torch.from_numpy(keep)]
    return Batches(limit_rows(texts, limit), limit_rows(y, limit), batch_size)

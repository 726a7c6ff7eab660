"""Long-tail evaluation slices for language models, from text that ships with the system.

Pruning loses ability unevenly (rare languages, code) while one English perplexity barely moves, so a
pruned LM is evaluated per slice:

==========  ==========================================================================  ====================
slice       text                                                                        source
==========  ==========================================================================  ====================
english     Jane Austen's "Persuasion", never used for calibration or recovery          Debian r-cran-janeaustenr
python      the running interpreter's standard library (`sysconfig` stdlib *.py files)  Python itself
de es it    short texts (quotes, jokes, proverbs) in each language, entries split at    Debian fortunes-de, -es,
pt pl ru    `%` lines; offensive (off/) folders and ASCII art skipped                   -it, -br, -pl, -ru
==========  ==========================================================================  ====================

`recovery_texts()` is the matching training side: paragraphs of the other five Austen novels, disjoint from
every evaluation slice. Every file is read as UTF-8 (checked for every file of the packages on Debian 12);
a file that is not valid UTF-8 is skipped with its name in `skipped_files`, never half-decoded.

    ev = pk.data.load("lm-slices", split="test", tokenizer=tok, length=256, windows=16)
    res = pk.evaluate(model, ev, metric="perplexity")          # batches carry their slice tags
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from prunekit.data.core import Batches, interleave, register_dataset
from prunekit.data.text import AUSTEN_BOOKS, austen_books, paragraphs
from prunekit.errors import DataError

FORTUNES = Path("/usr/share/games/fortunes")
# slice -> (folder or file under FORTUNES, Debian package)
LANGUAGES = {"de": ("de", "fortunes-de"), "es": ("es", "fortunes-es"), "it": ("it", "fortunes-it"),
             "pt": ("brasil", "fortunes-br"), "pl": ("pl", "fortunes-pl"), "ru": ("ru", "fortunes-ru")}
HELD_OUT_BOOK = "persuasion"
LM_SLICES = ("english", "python") + tuple(LANGUAGES)
SKIP_FILES = {"asciiart"}
skipped_files: List[str] = []


def _utf8(path: Path) -> Optional[str]:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skipped_files.append(str(path))
        return None


def fortune_files(lang: str) -> List[Path]:
    """Plain, non-empty fortune files of a language (no .dat indexes, symlinks, sub-folders)."""
    if lang not in LANGUAGES:
        raise DataError(f"unknown language slice '{lang}'; known: {sorted(LANGUAGES)}")
    where, package = LANGUAGES[lang]
    root = FORTUNES / where
    if not root.exists():
        raise DataError(f"LM slice '{lang}' reads {root}, which is missing: install the Debian package "
                        f"(`apt-get install -y {package}`, or `make system-deps`)")
    files = [root] if root.is_file() else sorted(root.iterdir())
    return [f for f in files if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8")
            and f.name not in SKIP_FILES and f.stat().st_size > 0]


def fortunes(lang: str) -> Iterator[str]:
    """Entries of a language's fortune files, round-robin over files so any prefix mixes sources."""
    per_file = []
    for f in fortune_files(lang):
        text = _utf8(f)
        if text:
            entries = [e.strip() for e in text.replace("\r\n", "\n").split("\n%\n")]
            per_file.append([e for e in entries if len(e) >= 20])
    for row in interleave(per_file):
        yield from row


def python_sources() -> Iterator[str]:
    """Source files of the interpreter's standard library (top level only, sorted)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise DataError(f"no *.py files in the standard library folder {root}; is this a full Python install?")
    for f in files:
        text = _utf8(f)
        if text:
            yield text


def lm_slice_texts(name: str) -> Iterator[str]:
    """Documents of one evaluation slice, in a fixed order."""
    if name == "english":
        yield from paragraphs(austen_books()[HELD_OUT_BOOK], min_chars=80)
    elif name == "python":
        yield from python_sources()
    elif name in LANGUAGES:
        yield from fortunes(name)
    else:
        raise DataError(f"unknown LM slice '{name}'; known: {list(LM_SLICES)}")


def recovery_texts() -> Iterator[str]:
    """English training text disjoint from every evaluation slice: paragraphs of the five Austen novels
    other than the held-out one, interleaved by book."""
    books = austen_books()
    per_book = [paragraphs(books[b], min_chars=80) for b in AUSTEN_BOOKS if b != HELD_OUT_BOOK]
    for row in interleave(per_book):
        yield from row


def _windows(docs: Iterator[str], tokenizer, length: int, count: int, name: str) -> torch.Tensor:
    """`count` non-overlapping windows of `length` tokens from the documents joined by blank lines."""
    if tokenizer is None:
        raise DataError(f"dataset '{name}' cuts token windows and needs tokenizer=<the model's tokenizer> (the CLI "
                        f"passes the one saved with --model)")
    ids: List[int] = []
    need = length * count
    for doc in docs:
        ids.extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise DataError(f"LM slice '{name}' has {len(ids)} tokens, fewer than {count} windows of {length}; "
                        f"ask for fewer windows or a shorter length")
    return torch.tensor(ids[:need], dtype=torch.long).view(count, length)


def lm_slices(tokenizer, length: int = 256, windows: int = 16, slices: Sequence[str] = LM_SLICES) -> Dict[str, torch.Tensor]:
    """{slice: int64 [windows, length]} token windows for per-slice perplexity."""
    if tokenizer is None:
        raise DataError("lm_slices needs tokenizer=<the model's tokenizer> to cut token windows")
    return {s: _windows(lm_slice_texts(s), tokenizer, length, windows, s) for s in slices}


@register_dataset("lm-slices")
def lm_slices_dataset(split: str = "test", batch_size: int = 4, limit: Optional[int] = None, tokenizer=None,
                      length: int = 256, windows: int = 16, slices: Sequence[str] = LM_SLICES) -> Batches:
    """Batches of (input_ids [B, length], slice tags [B]), slices interleaved window by window so a prefix
    (`limit`, `max_batches`) still covers every slice; evaluation only (both splits
    give the test windows: recovery text comes from `recovery_texts()`)."""
    per = lm_slices(tokenizer, length, windows, slices)
    order = [(s, i) for i in range(windows) for s in per]          # round robin: any prefix covers every slice
    ids = torch.stack([per[s][i] for s, i in order])
    tags = [s for s, _ in order]
    n = limit if limit is not None else len(tags)
    return Batches(ids[:n], tags[:n], batch_size)


@register_dataset("austen-lm")
def austen_lm_dataset(split: str = "train", batch_size: int = 1, limit: Optional[int] = None, tokenizer=None,
                      length: int = 256, windows: int = 512) -> Batches:
    """Token windows for causal LMs, inputs only (LongTensor [B, length] batches): split "train" cuts them from
    `recovery_texts()` (calibration and recovery), "test" from the held-out book (the english slice of
    lm-slices). Label-free: distillation and the LM loss need no targets."""
    docs = recovery_texts() if split == "train" else lm_slice_texts("english")
    n = windows if limit is None else min(windows, limit)
    return Batches(_windows(docs, tokenizer, length, n, f"austen-lm/{split}"), None, batch_size)

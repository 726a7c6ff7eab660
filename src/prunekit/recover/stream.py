"""Packed fixed-length token blocks streamed from text: the data side of token-budget recovery.

    blocks = PackedTokens(texts, seq_len=512, batch_size=2, tokenizer=tok)
    for ids in blocks:            # LongTensor [2, 512]; documents joined with EOS, no padding
        ...

A source is a path (a text file, or a directory whose files are read in sorted order), an iterable of
strings (tokenized with `tokenizer`), or an iterable of token ids (tensors / lists of ints). Documents are
tokenized one at a time and concatenated with `eos_id` between them; a buffer holds at most one block plus
one document, so a corpus of any size (or an endless generator) is never held in memory.

Resume: the stream position is the number of blocks already taken; `iter_from(n)` re-reads the source and
skips n blocks. That needs a source that can be read again (a path, a list, or a callable returning a fresh
iterable); a one-shot generator can be trained on but not resumed, and says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Union

import torch

from prunekit.errors import DataError

Source = Union[str, Path, Iterable, Callable[[], Iterable]]


def iter_text_files(path: Union[str, Path]) -> Iterator[str]:
    """Documents of a text file (blank-line separated paragraphs) or of every file in a directory, lazily."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"recover(data='{p}'): no such file or directory; give a text file, a directory of "
                        f"text files, or an iterable of strings / token ids")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            cur: List[str] = []
            for line in fh:
                if line.strip():
                    cur.append(line)
                elif cur:
                    yield "".join(cur)
                    cur = []
            if cur:
                yield "".join(cur)


def _ids_of(doc: Any, tokenizer, where: str) -> List[int]:
    if isinstance(doc, dict) and "input_ids" in doc:           # a calibration-style batch {"input_ids": ...}
        doc = doc["input_ids"]
    elif isinstance(doc, tuple) and doc and isinstance(doc[0], torch.Tensor):
        doc = doc[0]                                            # (input_ids, targets or slice tags)
    if isinstance(doc, str):
        if tokenizer is None:
            raise DataError(f"{where} holds text but no tokenizer was given: pass tokenizer=<a Hugging Face "
                            f"tokenizer> or give token-id tensors")
        return list(tokenizer(doc, add_special_tokens=False)["input_ids"])
    if isinstance(doc, torch.Tensor):
        if doc.dtype.is_floating_point:
            raise DataError(f"{where} holds a float tensor; token ids must be integers")
        return doc.flatten().tolist()
    if isinstance(doc, (list, tuple)) and all(isinstance(t, int) for t in doc):
        return list(doc)
    raise DataError(f"{where} holds a {type(doc).__name__}; expected str (with tokenizer=), an int tensor or a "
                    f"list of ints")


class PackedTokens:
    """An endless-or-finite stream of LongTensor [batch_size, seq_len] blocks packed from `source`.

    eos_id: token put between documents (default: tokenizer.eos_token_id, else none). `repeat`: start over
    when the source ends (a token budget larger than the corpus then takes more than one pass).
    """

    def __init__(self, source: Source, seq_len: int, batch_size: int = 1, tokenizer=None,
                 eos_id: Optional[int] = None, repeat: bool = True):
        if seq_len < 2 or batch_size < 1:
            raise DataError(f"PackedTokens needs seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        if isinstance(source, (str, Path)):
            path = source
            source = lambda: iter_text_files(path)                          # noqa: E731  (re-readable)
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.tokenizer = tokenizer
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.repeat = repeat
        self._one_shot = not callable(source) and iter(source) is source   # a generator / iterator
        self._used = False

    @property
    def resumable(self) -> bool:
        return not self._one_shot

    def _documents(self) -> Iterator:
        if self._one_shot:
            if self._used:
                raise DataError("recover(data=...) is a one-shot iterator (a generator) and was already read; "
                                "pass a list, a path, or a callable returning a fresh iterable to resume or repeat")
            self._used = True
            yield from self.source
            return
        passes = 0
        while True:
            n = 0
            for doc in (self.source() if callable(self.source) else self.source):
                n += 1
                yield doc
            passes += 1
            if n == 0:
                raise DataError("recover(data=...) yielded no documents")
            if not self.repeat:
                return

    def iter_from(self, skip: int = 0) -> Iterator[torch.Tensor]:
        """Blocks, after skipping the first `skip` (a resume re-reads the source up to where it stopped)."""
        if skip and self._one_shot:
            raise DataError(f"cannot resume a stream from a one-shot generator (it would have to skip {skip} "
                            f"blocks it cannot re-read); pass a list, a path, or a callable returning an iterable")
        need = self.seq_len * self.batch_size
        buf: List[int] = []
        taken = 0
        for i, doc in enumerate(self._documents()):
            buf.extend(_ids_of(doc, self.tokenizer, f"recover(data=...) item {i}"))
            if self.eos_id is not None:
                buf.append(int(self.eos_id))
            while len(buf) >= need:
                block, buf = buf[:need], buf[need:]
                taken += 1
                if taken > skip:
                    yield torch.tensor(block, dtype=torch.long).view(self.batch_size, self.seq_len)
        if taken <= skip:
            raise DataError(f"recover(data=...) holds fewer than {skip + 1} blocks of {self.batch_size} x "
                            f"{self.seq_len} tokens; give more text or a smaller seq_len / batch_size")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_from(0)

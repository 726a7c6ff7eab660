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
lm-slices          (input_ids int64 [B, L] windows, slice tag list[str] [B]), see data/lm.py     Debian fortunes-*, stdlib, Austen
=================  ============================================================================  ==========

Modules: core.py (Batches, the registry, `load`), images.py, text.py, lm.py (long-tail LM evaluation slices:
held-out Austen, Python source, other languages).

Any other spec of the form ``"package.module:function"`` is imported and called as
``function(split=split, batch_size=batch_size, limit=limit, **kwargs)``; it must return an iterable of batches.
"""
from prunekit.data.core import (SPLITS, Batches, available, cache_dir, every_fifth_is_test, interleave, limit_rows,
                                load, register_dataset, resolve_callable, takes_tokenizer)
from prunekit.data.images import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                                  digits, fashion_mnist)
from prunekit.data.lm import LM_SLICES, lm_slice_texts, lm_slices, recovery_texts
from prunekit.data.text import (AUSTEN_BOOKS, austen, austen_books, ensure_janeaustenr, lee, lee_sim, lee_similarity,
                                polarity)

__all__ = ["SPLITS", "Batches", "available", "cache_dir", "load", "register_dataset", "resolve_callable", "takes_tokenizer",
           "every_fifth_is_test", "interleave", "limit_rows", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR",
           "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "digits", "fashion_mnist", "AUSTEN_BOOKS", "austen",
           "austen_books", "ensure_janeaustenr", "lee", "lee_sim", "lee_similarity", "polarity", "LM_SLICES",
           "lm_slice_texts", "lm_slices", "recovery_texts"]

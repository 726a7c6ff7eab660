"""The demo's evaluations, each one `pk.evaluate` call on fixed data in a fixed order, sliced for
`pk.compare_slices`: Lee document similarity (by document length) and a polarity probe (by label, by length)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

import prunekit as pk
from demo_text import LEE_MAX_TOKENS, SENTENCE_MAX_TOKENS, embed_chunks, length_chunks, polarity_sentences

PROBE_FOLDS = 5


class TextSetEncoder(nn.Module):
    """A fixed set of texts as a model: forward(row=indices) -> their sentence embeddings [len(row), dim].

    Why: Lee similarity has 1225 scored pairs over only 50 documents. `pk.evaluate`'s embedding_similarity
    metric embeds both sides of every pair it is given; handing it document *indices* and embedding the 50
    documents once per call keeps its metric, slicing and bootstrap while doing 25x less encoder work."""

    def __init__(self, encoder: nn.Module, chunks, n: int):
        super().__init__()
        self.encoder, self._chunks, self._n = encoder, chunks, n

    def forward(self, row: torch.Tensor) -> torch.Tensor:
        return embed_chunks(self.encoder, self._chunks, self._n)[row]


class ProbeClassifier(nn.Module):
    """Logistic-regression probe on frozen sentence embeddings: forward(row) -> out-of-fold logits [len(row), 2].

    Each text is classified by a probe fitted on the other folds of a fixed stratified split, so every one of
    the 200 polarity sentences gets an honest prediction and per-slice accuracies rest on all of them. The
    split and the solver are deterministic, so the same encoder weights always give the same accuracy."""

    def __init__(self, encoder: nn.Module, chunks, labels: np.ndarray, folds: np.ndarray):
        super().__init__()
        self.encoder, self._chunks, self._labels, self._folds = encoder, chunks, labels, folds

    def forward(self, row: torch.Tensor) -> torch.Tensor:
        from sklearn.linear_model import LogisticRegression
        x = embed_chunks(self.encoder, self._chunks, len(self._labels)).double().numpy()
        logits = np.zeros((len(x), 2))
        for k in np.unique(self._folds):
            test = self._folds == k
            clf = LogisticRegression(C=10.0, max_iter=2000).fit(x[~test], self._labels[~test])
            d = clf.decision_function(x[test])
            logits[test] = np.stack([-d / 2, d / 2], 1)
        return torch.from_numpy(logits)[row]


class EvalSuite:
    """The demo's evaluations: one `pk.evaluate` call each, on fixed data in a fixed order (so dense and
    pruned results pair up example by example for `pk.compare_slices`).

    lee:              Pearson r between embedding cosine and human similarity over the 1225 Lee document
                      pairs, sliced by the two documents' lengths (short/long at the median token count).
    polarity_label:   probe accuracy on the 200 polarity sentences, sliced neg / pos.
    polarity_length:  the same probe predictions sliced by sentence length (word-count tertiles).
    """
    PRIMARY = "lee"

    def __init__(self, tokenizer):
        from sklearn.model_selection import StratifiedKFold
        docs, sim = pk.data.lee_similarity()
        self.lee_chunks = length_chunks(tokenizer, docs, LEE_MAX_TOKENS, 8)
        self.n_docs = len(docs)
        i, j = torch.triu_indices(len(docs), len(docs), offset=1)
        self.lee_data = [({"row": i}, {"row": j}, sim[i, j])]
        ntok = np.array([len(t) for t in tokenizer(docs, truncation=True, max_length=LEE_MAX_TOKENS)["input_ids"]])
        med = float(np.median(ntok))
        long_doc = ntok > med
        names = {0: f"both short (<= {med:.0f} tokens)", 1: "one short, one long",
                 2: f"both long (> {med:.0f} tokens)"}
        self.lee_tags = [names[int(long_doc[a]) + int(long_doc[b])] for a, b in zip(i.tolist(), j.tolist())]

        texts, labels = polarity_sentences()
        self.labels = labels
        self.pol_chunks = length_chunks(tokenizer, texts, SENTENCE_MAX_TOKENS, 32)
        self.folds = np.zeros(len(texts), dtype=np.int64)
        skf = StratifiedKFold(n_splits=PROBE_FOLDS, shuffle=True, random_state=0)
        for k, (_, test) in enumerate(skf.split(np.zeros(len(labels)), labels)):
            self.folds[test] = k
        self.pol_data = [({"row": torch.arange(len(texts))}, torch.from_numpy(labels))]
        words = np.array([len(t.split()) for t in texts])
        lo, hi = np.quantile(words, [1 / 3, 2 / 3])
        self.pol_tags = {
            "polarity_label": ["neg" if y == 0 else "pos" for y in labels],
            "polarity_length": [f"short (<= {lo:.0f} words)" if w <= lo else
                                (f"long (> {hi:.0f} words)" if w > hi else f"medium ({lo + 1:.0f}-{hi:.0f} words)")
                                for w in words],
        }

    def run(self, encoder: nn.Module, reference: Optional[Dict[str, pk.EvalResult]] = None,
            n_boot: int = 1000, names: Sequence[str] = ("lee", "polarity_label", "polarity_length")
            ) -> Dict[str, pk.EvalResult]:
        """{evaluation name: EvalResult}; with `reference` (the dense results) each carries `.comparison`.

        The two polarity views share one `pk.evaluate` call: the per-example rows are the same, only the slice
        tags differ, so the length view is the label view re-tagged (`EvalResult.from_dict` recomputes slices)."""
        out = {}
        if "lee" in names:
            model = TextSetEncoder(encoder, self.lee_chunks, self.n_docs)
            out["lee"] = pk.evaluate(model, self.lee_data, metric="embedding_similarity", slices=self.lee_tags)
        pol = [n for n in names if n.startswith("polarity_")]
        if pol:
            model = ProbeClassifier(encoder, self.pol_chunks, self.labels, self.folds)
            first = pk.evaluate(model, self.pol_data, metric="accuracy", slices=self.pol_tags[pol[0]])
            for name in pol:
                out[name] = first if name == pol[0] else retag(first, self.pol_tags[name])
        for name, res in out.items():
            if reference is not None and name in reference:
                res.comparison = pk.compare_slices(reference[name], res, n_boot=n_boot)
        return out


def retag(result: pk.EvalResult, tags: Sequence[Any]) -> pk.EvalResult:
    """The same per-example evaluation with other slice tags (one per example, in data order)."""
    d = result.to_dict()
    d.pop("comparison", None)
    d["per_example"]["tags"] = list(tags)
    return pk.EvalResult.from_dict(d)

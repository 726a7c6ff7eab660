"""The tokenizer part of a GGUF file: copied from a source GGUF, or built from a Hugging Face BPE tokenizer.

Both return {key: (value, GGUFValueType, array element type or None)} for GGUFWriter.add_key_value, and both
check the vocabulary against the model's embedding rows before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from prunekit.errors import ExportError

Fields = Dict[str, Tuple[Any, Any, Optional[Any]]]
# llama.cpp's token types (llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _from_gguf(path: Path, vocab: int) -> Fields:
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ExportError(f"export_gguf: tokenizer='{path}' is not a readable GGUF file ({e})") from e
    out: Fields = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out[key] = (field.contents(), vtype, sub)
    n = len(out.get("tokenizer.ggml.tokens", ([], None, None))[0])
    if not n:
        raise ExportError(f"export_gguf: tokenizer='{path}' holds no tokenizer.ggml.tokens; pass the model's "
                          f"source GGUF or a Hugging Face tokenizer")
    if n != vocab:
        raise ExportError(f"export_gguf: tokenizer='{path}' has {n} tokens but the model's embedding has {vocab} "
                          f"rows; pass the tokenizer the model was trained with")
    return out


def _token_list(tok, vocab: int) -> Tuple[List[str], List[int]]:
    ids = tok.get_vocab()
    if max(ids.values()) >= vocab:
        raise ExportError(f"export_gguf: the tokenizer has ids up to {max(ids.values())} but the model's embedding "
                          f"has {vocab} rows; pass the tokenizer the model was trained with")
    special = set(getattr(tok, "all_special_tokens", []))
    added = set(getattr(tok, "get_added_vocab", dict)().keys())
    tokens = [f"[PAD{i}]" for i in range(vocab)]
    types = [UNUSED] * vocab
    for t, i in ids.items():
        tokens[i] = t
        types[i] = CONTROL if t in special else USER_DEFINED if t in added else NORMAL
    return tokens, types


def _from_hf(tok, vocab: int, pre: str) -> Fields:
    import gguf
    backend = getattr(tok, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise ExportError(f"export_gguf: tokenizer {type(tok).__name__} is not a byte-level BPE tokenizer "
                          f"(model type {model.get('type')!r}); pass the model's source .gguf as tokenizer=")
    tokens, types = _token_list(tok, vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    A, S, U, I32, B = (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32,
                       gguf.GGUFValueType.INT32, gguf.GGUFValueType.BOOL)
    out: Fields = {"tokenizer.ggml.model": ("gpt2", S, None), "tokenizer.ggml.pre": (pre, S, None),
                   "tokenizer.ggml.tokens": (tokens, A, S), "tokenizer.ggml.token_type": (types, A, I32),
                   "tokenizer.ggml.merges": (merges, A, S),
                   "tokenizer.ggml.add_bos_token": (bool(getattr(tok, "add_bos_token", False)), B, None)}
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        v = getattr(tok, attr, None)
        if isinstance(v, int) and 0 <= v < vocab:
            out[f"tokenizer.ggml.{key}_token_id"] = (v, U, None)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        out["tokenizer.chat_template"] = (template, S, None)
    return out


def tokenizer_fields(source, vocab: int, pre: str = "default") -> Fields:
    """GGUF tokenizer keys from `source`: a .gguf path, a Hugging Face tokenizer, or a directory holding one."""
    if source is None:
        raise ExportError("export_gguf: no tokenizer: pass tokenizer= (the model's source .gguf, a Hugging Face "
                          "tokenizer, or its directory); llama.cpp cannot load a GGUF without one")
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_file() and p.suffix == ".gguf":
            return _from_gguf(p, vocab)
        if not (p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file())):
            raise ExportError(f"export_gguf: tokenizer='{p}' is neither a .gguf file nor a directory with "
                              f"tokenizer.json; pass the model's source GGUF or a Hugging Face tokenizer")
        from transformers import AutoTokenizer
        source = AutoTokenizer.from_pretrained(str(p))
    if not hasattr(source, "get_vocab"):
        raise ExportError(f"export_gguf: tokenizer is a {type(source).__name__}; pass a .gguf path, a Hugging Face "
                          f"tokenizer or its directory")
    return _from_hf(source, vocab, pre)

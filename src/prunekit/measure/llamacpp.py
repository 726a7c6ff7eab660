"""Run a GGUF file in llama.cpp (through llama-cpp-python): logits, perplexity, prefill and decode speed.

Token ids go in directly (no tokenization), so llama.cpp and PyTorch see exactly the same input. The KV cache
is F32 by default (`f32_cache=True`): llama.cpp's default F16 cache alone moves logits by ~1e-3 relative, which
would hide export errors in the comparison.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np

from prunekit.errors import ExportError

GGML_TYPE_F32 = 0
ALLOW_AMX = "PRUNEKIT_LLAMACPP_ALLOW_AMX"


def _quantized(path: Union[str, Path]) -> bool:
    """Does the GGUF hold any tensor that is not F32 / F16 / BF16?"""
    import gguf
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    return any(t.tensor_type not in plain for t in gguf.GGUFReader(str(path)).tensors)


def build_info(llama_cpp) -> str:
    """llama.cpp's list of the CPU features it was compiled for ("CPU : AVX2 = 1 | ... | AMX_INT8 = 1 | ...").
    The build, not only the machine, decides which quantized kernels run."""
    info = llama_cpp.llama_print_system_info()
    return (info.decode(errors="replace") if isinstance(info, bytes) else str(info)).strip()


def check_amx(llama_cpp, path: Union[str, Path]) -> None:
    """llama.cpp built with its AMX backend (a native build on a Sapphire-Rapids-class CPU) segfaults in the first
    matmul of quantized weights (seen here with llama-cpp-python 0.3.36 on every Q8_0 file; upstream
    ggml-org/llama.cpp#20824): a segfault would take the whole Python process down, so refuse with the fix."""
    if "AMX_INT8 = 1" in build_info(llama_cpp) and not os.environ.get(ALLOW_AMX) and _quantized(path):
        raise ExportError(f"llama.cpp here is built with its AMX backend, which segfaults on quantized files such "
                          f"as '{path}' (ggml-org/llama.cpp#20824); reinstall llama-cpp-python built without it: "
                          f"CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' pip install "
                          f"--force-reinstall --no-binary llama-cpp-python llama-cpp-python (as `make llamacpp` "
                          f"does), or set {ALLOW_AMX}=1 to try anyway")


def open_gguf(path: Union[str, Path], n_ctx: int = 512, threads: int = 2, logits_all: bool = False,
              f32_cache: bool = True):
    """A llama_cpp.Llama on `path` (quiet, `threads` threads for prompt and decode)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError("llama.cpp is not installed: pip install llama-cpp-python (make bench installs it)") from e
    if not Path(path).is_file():
        raise ExportError(f"'{path}' does not exist; write it with pk.export_gguf first")
    check_amx(llama_cpp, path)
    kw = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                               verbose=False, **kw)
    except ValueError as e:
        raise ExportError(f"llama.cpp could not load '{path}' ({e}); run with verbose logging to see why") from e


def gguf_logits(path: Union[str, Path], ids: Sequence[int], threads: int = 2, f32_cache: bool = True) -> np.ndarray:
    """(len(ids), vocab) float32 logits llama.cpp computes for `ids` in one prefill."""
    llm = open_gguf(path, n_ctx=max(32, len(ids)), threads=threads, logits_all=True, f32_cache=f32_cache)
    llm.eval(list(map(int, ids)))
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


def _last_logits(llm) -> np.ndarray:
    """Logits of the last evaluated token (llama-cpp-python fills `scores` only with logits_all=True)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def gguf_greedy(path: Union[str, Path], ids: Sequence[int], n: int, threads: int = 2) -> List[int]:
    """`n` greedy (argmax) tokens after `ids`."""
    llm = open_gguf(path, n_ctx=len(ids) + n + 8, threads=threads)
    llm.eval(list(map(int, ids)))
    out = []
    for _ in range(n):
        nxt = int(np.argmax(_last_logits(llm)))
        out.append(nxt)
        llm.eval([nxt])
    llm.close()
    return out


def gguf_perplexity(path: Union[str, Path], windows: Sequence[Sequence[int]], threads: int = 2) -> float:
    """exp(mean NLL) of each window's next tokens (window[1:] given window[:-1]), each window from an empty
    cache: the same quantity as a PyTorch `model(input_ids=w, labels=w).loss` over the same windows."""
    n_ctx = max(len(w) for w in windows)
    llm = open_gguf(path, n_ctx=n_ctx, threads=threads, logits_all=True)
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(list(map(int, w)))
        logits = np.asarray(llm.scores[:len(w) - 1], dtype=np.float64)
        logz = np.logaddexp.reduce(logits, axis=1)
        nll += float(np.sum(logz - logits[np.arange(len(w) - 1), np.asarray(w[1:])]))
        count += len(w) - 1
    llm.close()
    return math.exp(nll / count)


def gguf_speed(llm, prompt: Sequence[int], n_decode: int) -> Dict[str, float]:
    """One prefill of `prompt` and `n_decode` greedy decode steps on an open Llama: tokens per second each."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(list(map(int, prompt)))
    t1 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([int(np.argmax(_last_logits(llm)))])
    t2 = time.perf_counter()
    return {"prefill_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": n_decode / (t2 - t1)}


def interleaved_speeds(paths: Dict[str, Union[str, Path]], prompt: Sequence[int], n_decode: int, reps: int,
                       threads: int = 2, f32_cache: bool = False) -> Dict[str, Dict[str, float]]:
    """{name: median prefill/decode tokens/s} of GGUF files timed in turn, `reps` rounds. One file is open at a
    time: the idle worker threads of a second open context compete for the cores (seen here: 10x swings on a
    2-core machine), and each opening is warmed up (two short untimed runs: the first evals of a fresh file
    pay for page faults and thread start-up, ~0.5 s each on a busy machine)."""
    runs: Dict[str, List[Dict[str, float]]] = {k: [] for k in paths}
    for _ in range(reps):
        for k, path in paths.items():
            llm = open_gguf(path, n_ctx=len(prompt) + n_decode + 8, threads=threads, f32_cache=f32_cache)
            try:
                for _ in range(2):
                    gguf_speed(llm, prompt[:8], 2)
                runs[k].append(gguf_speed(llm, prompt, n_decode))
            finally:
                llm.close()
    return {k: {m: statistics.median(r[m] for r in rs) for m in ("prefill_tok_s", "decode_tok_s")}
            for k, rs in runs.items()}

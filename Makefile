# prunekit: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both create .venv and install what they need from this repository's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-lock.txt 2>/dev/null | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch/torchvision resolve from this machine's local wheel store (capped at 2.14.1 / 0.29.1)
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[hf,export,assets,vision,test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m prunekit.demo

test: install
	$(BIN)/python -m pytest -q -x --timeout=1800

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow" --timeout=7200

bench: install
	$(BIN)/pip install -q "torch-pruning==1.6.1"
	$(BIN)/python benchmarks/structural.py

clean:
	rm -rf $(VENV) .pytest_cache

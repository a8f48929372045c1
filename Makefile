# Two entry points (README): `make demo` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU machines get the CPU wheel of torch pinned here; it is installed before the package so that
# pip never resolves `torch` to the multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python -m dsv4.demo

# Without a GPU the Triton kernels run (and are tested) in Triton's interpreter.
INTERPRET := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 0 || echo 1)

test: install-test
	TRITON_INTERPRET=$${TRITON_INTERPRET:-$(INTERPRET)} $(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs

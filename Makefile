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

test: install-test
	$(BIN)/python -m pytest -x -q tests

clean:
	rm -rf $(VENV) runs

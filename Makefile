# Everyday targets. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The torch engine (worker/gpu/) is tested on the CPU with PyTorch's CPU build; this
# machine kind keeps that wheel on disk (a bare `torch` would fetch a CUDA build of GBs).
TORCH  ?= torch==2.13.0

.PHONY: install build test test-pure demo bench lint clean cclient sysdeps

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || { apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(VENV)/bin/python pyproject.toml setup.py $(wildcard ext/*.pyx ext/*.pxd) | sysdeps
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q '$(TORCH)' || echo "make: $(TORCH) not installed; the torch engine's tests skip"
	$(PY) setup.py -q build_ext --inplace
	touch $(STAMP)

install: $(STAMP)

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# System packages: zmq.h for ext/_frames and the example C client; a no-op when present.
sysdeps:
	@pkg-config --exists libzmq 2>/dev/null || apt-get install -y libzmq3-dev pkg-config \
	  || { apt-get update && apt-get install -y libzmq3-dev pkg-config; }

cclient: build/mtclient

build/mtclient: examples/c/mtclient.c | sysdeps
	mkdir -p build
	cc -O2 -std=c99 -Wall -Wextra -o $@ $< $$(pkg-config --cflags --libs libzmq)

# The suite runs twice: with the C core, then with its pure-Python twins.
test: $(STAMP) sysdeps
	$(PY) -m pytest -q -x
	MTSERVE_PUREPYTHON=1 $(PY) -m pytest -q -x -m "not slow"

demo: $(STAMP)
	$(PY) -m bench.demo

bench: $(STAMP)
	$(VENV)/bin/mtbench latency

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info ext/*.c ext/*.so .pytest_cache .ruff_cache state

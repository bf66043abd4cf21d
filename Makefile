# Developer entry points (the README's two commands are `make demo` and `make test`).
#
#   make demo     set up .venv, build the core, run the demo (the main job)
#   make test     set up .venv, build the core with checks on (debug), run the tests
#   make bench    release build, run the benchmark suite (prints tables)
#   make compile  release build of the core in place
#   make debug    debug build of the core in place (bounds + invariant checks)
#   make asan     debug build with AddressSanitizer and UBSan

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test bench compile debug asan venv clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "setuptools>=68" wheel "Cython>=3.0.10,<4" "numpy>=1.26"
	$(PIP) install --quiet --no-build-isolation -e ".[test]"
	touch $@

venv: $(VENV)/.installed

compile: venv
	$(PY) setup.py --quiet build_ext --inplace

debug: venv
	INGESTOR_DEBUG=1 $(PY) setup.py --quiet build_ext --inplace

asan: venv
	INGESTOR_DEBUG=1 INGESTOR_SANITIZE=address,undefined $(PY) setup.py --quiet build_ext --inplace

demo: compile
	$(VENV)/bin/ingestor demo

test: debug
	$(PY) -m pytest

bench: compile
	$(VENV)/bin/ingestor bench

clean:
	rm -rf build src/ingestor/_core.c src/ingestor/*.so src/ingestor/*.html

# The two commands a new machine needs: `make demo` and `make test`. Both build .venv from scratch
# when it is missing (torch is installed first and pinned: an unpinned torch pulls a CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ember-installed
TORCH_PIN := torch==2.13.0
PACKAGES := ember trainer callbacks strategies precision
# DeepSpeed JIT-compiles C++ ops (minutes, once): keep the builds outside the checkout, for every run.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/ember/torch_extensions

.PHONY: demo test lint typecheck unit install clean bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ember launch --nproc-per-node 2 examples/digits.py

lint: $(STAMP)
	$(BIN)/ruff check $(PACKAGES) tests examples $(wildcard benchmarks)
	$(BIN)/ruff format --check $(PACKAGES) tests examples $(wildcard benchmarks)

# mypy cannot follow setuptools' package-dir mapping, so it checks a tree of links laid out the
# way the package installs (ember/strategies -> strategies/, ...).
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck
	cp -rs $(CURDIR)/ember build/typecheck/ember
	for d in trainer callbacks strategies precision; do ln -s $(CURDIR)/$$d build/typecheck/ember/$$d; done
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p ember

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

# Benchmarks write their tables into benchmarks/RESULTS.md (minutes; not part of `make test`).
bench: $(STAMP)
	$(BIN)/python benchmarks/fsdp_memory.py
	$(BIN)/python benchmarks/zero_memory.py

clean:
	rm -rf $(VENV) build dist *.egg-info

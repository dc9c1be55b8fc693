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

# torch_xla 2.9 needs torch 2.9: the XLA suite runs in its own venv (about 4 GB, ~2 minutes to build).
# The venv lives in a cache outside the checkout, built once per pyproject.toml (clean clones and CI
# reuse it); .venv-xla links to it, and each run points its editable ember at this checkout.
XLA_VENV := .venv-xla
XLA_CACHE := $(HOME)/.cache/ember/venv-xla-torch2.9.0
XLA_PINS := torch==2.9.0 torch_xla==2.9.0
XLA_TOOLS := 'pytest>=8' 'pytest-timeout>=2.3' 'pytest-xdist>=3.6'
XLA_BUILT := $(XLA_CACHE)/.built-$(shell (cat pyproject.toml; echo "$(XLA_PINS) $(XLA_TOOLS)") | sha1sum | cut -c1-12)
XLA_STAMP := .venv-xla-linked

.PHONY: demo test lint typecheck unit docs xla install install-xla clean bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install-xla: $(XLA_STAMP)

$(XLA_STAMP): pyproject.toml
	test -x $(XLA_CACHE)/bin/python || $(PYTHON) -m venv $(XLA_CACHE)
	test -e $(XLA_BUILT) || ($(XLA_CACHE)/bin/python -m pip install --quiet --upgrade pip && \
		$(XLA_CACHE)/bin/python -m pip install --quiet $(XLA_PINS) -e . $(XLA_TOOLS) && \
		touch $(XLA_BUILT))
	ln -sfn $(XLA_CACHE) $(XLA_VENV)
	touch $(XLA_STAMP)

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

# Two workers: most tests wait on child processes (2-rank groups, launchers, signals) for part of
# their time, so a second worker fills the idle core. worksteal hands the slow multi-process tests
# out as workers free up instead of fixing the split at the start. About 12 minutes here: the rank
# processes and docs pages fork from a Python with torch, torch._dynamo and ember imported (tests/warm_python.py).
unit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=15 -m "not bench"

# The documentation site (mkdocs.yml) into build/site. mkdocstrings reads the package statically, from
# the same kind of link tree as mypy; --strict fails on any warning (broken link, missing object...).
docs: $(STAMP)
	rm -rf build/docs-src && mkdir -p build/docs-src
	cp -rs $(CURDIR)/ember build/docs-src/ember
	for d in trainer callbacks strategies precision; do ln -s $(CURDIR)/$$d build/docs-src/ember/$$d; done
	$(BIN)/mkdocs build --strict --site-dir build/site

# tests/xla on the XLA CPU device, under torch 2.9 (the main suite leaves them out: no torch_xla there).
# Two workers, as in `unit`: the tests wait on launched processes; ~1m50 here instead of ~3 minutes.
xla: $(XLA_STAMP)
	$(XLA_VENV)/bin/python -m pip install --quiet --no-deps -e .  # (the shared venv: this checkout's ember)
	PJRT_DEVICE=CPU $(XLA_VENV)/bin/python -m pytest -q -n 2 --dist worksteal --durations=10 tests/xla

test: lint typecheck unit docs xla

# The benchmark suite (benchmarks/run.py, about 22 minutes here): RESULTS.md and ratios.png in benchmarks/.
# It compares ember with Lightning and Accelerate, installed here only (the `bench` extra; torch stays
# pinned in the same command). Not part of `make test`. GPU section: $(BIN)/python benchmarks/run.py --device cuda
BENCH_STAMP := $(VENV)/.ember-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN) -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m pytest -q -n 2 -m bench tests/benchmarks
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(XLA_VENV) $(XLA_STAMP) build dist *.egg-info

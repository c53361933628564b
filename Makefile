# make demo: build .venv (if needed) and run the embedded quickstart, printing accuracy before/after.
# make test: build .venv (if needed) and run the whole test suite.
# make lint: ruff (whole repository) and mypy (the core's plugin contract).
# Both work on a fresh machine with only Python 3.11 and pip, and install exactly the tested
# set of packages: every install goes through requirements/lock.txt (pip --constraint).
# make lock: re-resolve the newest versions the pyproject ranges allow and write them to the lock.
# make test-latest: the suite on those newest versions (a separate .venv-latest), lock untouched.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fmtune-installed
LOCK := requirements/lock.txt
LATEST := .venv-latest
PLUGIN_DIRS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))
EDITABLES := -e '.[test]' $(foreach p,$(PLUGIN_DIRS),-e $(p))
DEMO_DIR ?= runs/quickstart

.PHONY: demo test lint packaging venv bench bench-check clean lock test-latest latest-venv

venv: $(STAMP)

# torch first: the lock names torch 2.14.1, which lies on the development machines' disk
# (gptqmodel, in plugins/quant_gptq, needs >= 2.14.1; the build runs on CPU too); installed
# alone first so pip never downloads another build for the core's torch range.
$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) $(LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) torch
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) $(EDITABLES)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart/demo.py --output_dir $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff on the whole repository, mypy on the core's plugin contract (hookspecs, plugins,
# config, stash); both configured in pyproject.toml, both pinned in the lock
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# each plugin's wheel installed alone with the core's wheel in a clean virtualenv: listed by
# `fmtune plugins`, passing its own tests there (slow: minutes per plugin)
packaging: $(STAMP)
	$(BIN)/python -m pytest -q tests/packaging_wheels.py

# the newest versions the pyproject ranges allow, in a fresh .venv-latest (no lock)
latest-venv:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet torch==2.14.1
	$(LATEST)/bin/python -m pip install --quiet --upgrade $(EDITABLES)

test-latest: latest-venv
	$(LATEST)/bin/python -m pytest -q

# freeze the newest resolvable set into the lock; run `make test` afterwards (the stamp
# depends on the lock, so .venv is brought to it)
lock: latest-venv
	{ echo "# The tested set of packages for Python 3.11 on Linux x86_64: every Makefile target"; \
	  echo "# that installs uses it as a pip constraint. Written by 'make lock' (pip freeze of a"; \
	  echo "# fresh install of the core, every plugin and the test extras at the newest versions"; \
	  echo "# the pyproject ranges allow) on $$(date -u +%Y-%m-%d). Do not edit by hand."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | grep -v -i '^fmtune' | LC_ALL=C sort -f; \
	} > $(LOCK).new
	mv $(LOCK).new $(LOCK)

bench: $(STAMP)
	$(BIN)/python bench/startup.py

# quick benchmarks, each a ratio measured side by side in one run, that must stay within the
# limits bench/check.py states (see docs/benchmarks.md, "CI performance check"); ~3-5 min on 2 cores
bench-check: $(STAMP)
	$(BIN)/python bench/check.py

clean:
	rm -rf $(VENV) $(LATEST) runs

# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and installs what
# it needs by itself; constraints.txt pins the torch release this project is tested with.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# mypy reads the three folders as the package they install as (kernels/ is actindex.kernels, ...), so that types
# cross from one folder to another; build/typecheck holds the links that make that package.
TYPECHECK := build/typecheck

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[demo,test,fast]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/actindex demo --out demo-output

test: lint
	$(PY) -m pytest -q

# The everyday loop: the suite without the slow, distributed and browser tests (about a minute here).
test-fast: lint
	$(PY) -m pytest -q -m "not slow and not distributed and not browser"

lint: $(STAMP)
	$(PY) -m ruff check .
	@mkdir -p $(TYPECHECK)/actindex
	@for name in kernels indexer query; do ln -sfn $(CURDIR)/$$name $(TYPECHECK)/actindex/$$name; done
	MYPYPATH=$(TYPECHECK) $(PY) -m mypy -p actindex

bench: $(STAMP)
	$(PY) scripts/bench_index.py

clean:
	rm -rf $(VENV) demo-output build .pytest_cache .mypy_cache .ruff_cache

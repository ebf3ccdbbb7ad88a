# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and installs what
# it needs by itself; constraints.txt pins the torch release this project is tested with.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[demo,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/actindex demo --out demo-output

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy kernels indexer query
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy kernels indexer query

bench: $(STAMP)
	$(PY) scripts/bench_index.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache

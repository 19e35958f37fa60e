# The two commands: `make demo` and `make test`. Each bootstraps its own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dsrflow-installed

.PHONY: demo test lint bench schemas clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "dsrflow needs Python 3.11+"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/dsrflow demo

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check dsrflow tests examples benchmarks
	$(VENV)/bin/mypy dsrflow examples

bench: $(STAMP)
	$(PY) benchmarks/pipeline.py $(BENCH_ARGS)

schemas: $(STAMP)
	$(VENV)/bin/dsrflow topics schemas

clean:
	rm -rf $(VENV) .dsrflow

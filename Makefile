# The two commands a newcomer needs: `make run` (the pipeline end to end) and `make test`.
# Both create .venv and install the pinned requirements on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-fast lint bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

## Run the whole pipeline on generated click logs (or DATA=path-or-s3-uri) with embedded defaults.
run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pipeline demo $(if $(DATA),--data $(DATA),)

## The full test suite, as CI runs it (real PostgreSQL/Redis; SeaweedFS/MLflow/Airflow started by the tests).
test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

## Quick local loop: skip the slow accuracy runs and the full process stack.
test-fast: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m "not slow and not stack"

## Style, types and the layer contract (pyproject.toml: [tool.ruff], [tool.mypy], [tool.importlinter]).
lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline dags tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) bench/bench_preprocess.py
	$(PY) bench/bench_train.py

clean:
	rm -rf .local .pytest_cache

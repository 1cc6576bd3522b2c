# The two commands of kubeworld. Each creates .venv on first use from the lock file.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test bench lock clean

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip sync --quiet --python $(PY) requirements.lock
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -e .
	touch $@

run: $(VENV)/.installed  ## the whole pipeline on the local testbed
	$(PY) -m experiments.pipeline $(ARGS)

test: $(VENV)/.installed  ## the tests, ruff included
	$(PY) -m pytest $(ARGS)

bench: $(VENV)/.installed  ## environment throughput benchmark
	$(PY) -m experiments.bench $(ARGS)

lock: $(VENV)/.installed  ## re-resolve requirements.lock from pyproject.toml
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) outputs multirun

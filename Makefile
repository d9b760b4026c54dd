# curvlab: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN := torch==2.13.0

.PHONY: install demo test lint format bench docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Install the pinned CPU torch first when none is present, so that no range pulls a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The docs tools (the `docs` extra) only for `make docs`, so `make test` needs none of them.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[dev,docs]"
	touch $@

demo: install
	$(VENV)/bin/curvlab run fullbatch --dataset bundled --out runs/demo
	@echo "results: runs/demo/results.jsonl, plots: runs/demo/*.png"

test: install
	$(PY) -m pytest tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# HTML site from docs/ and the docstrings; warnings are errors. -E: a fresh read of every page, so
# no warning is hidden by an earlier build.
docs: $(VENV)/.docs-installed
	$(PY) -m sphinx -b html -E -W --keep-going -q docs build/docs/html
	@echo "docs: build/docs/html/index.html"

bench: install
	$(PY) benchmarks/exact_gn.py

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info src/*.egg-info

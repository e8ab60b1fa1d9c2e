# Two entry points (make demo, make test); both set up .venv on a fresh machine first
# (Python 3.12 via .python-version), installing the tested set (constraints.txt).
PYTHON ?= python3.12
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo swap-demo test lint docs bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[cpu,test,demo,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m training_examples.grpo_tiny

swap-demo: $(STAMP)
	$(VENV)/bin/python -m training_examples.swap_demo

# style, the import layers (pyproject.toml [tool.importlinter]) and the public API's types
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# the docs site, strictly (a warning is an error); benchmark tables from docs/benchmarks/results
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir runs/site

# Two workers, one test file each at a time (module-scoped engines stay in one process).
TEST_WORKERS ?= 2

test: lint
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/update_params.py

clean-venv:
	rm -rf $(VENV)

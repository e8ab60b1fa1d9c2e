# Two entry points; both set up .venv on a fresh machine first (Python 3.12 via .python-version).
PYTHON ?= python3.12
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo swap-demo test lint bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[cpu,test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m training_examples.grpo_tiny

swap-demo: $(STAMP)
	$(VENV)/bin/python -m training_examples.swap_demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two workers, one test file each at a time (module-scoped engines stay in one process).
TEST_WORKERS ?= 2

test: lint
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/update_params.py

clean-venv:
	rm -rf $(VENV)

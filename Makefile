# make setup: install everything (scripts/setup) | make test: lint, format and type checks, then the test suite
# make demo: the pipeline on synthetic data, SimCLR (demo/) | make demo-full: SimCLR and Barlow Twins
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test demo demo-full
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock scripts/setup
	scripts/setup
	touch $@

test: setup
	ruff check .
	ruff format --check .
	mypy
	python -m pytest

demo: setup
	scripts/demo

demo-full: setup
	METHODS='simclr barlow_twins' scripts/demo

# make setup: install everything (scripts/setup) | make test: lint, format and type checks, then the test suite
# make demo: the pipeline on synthetic data, SimCLR (demo/) | make demo-full: SimCLR and Barlow Twins
# make demo-figures: the paper's Fig. 3 and Fig. 4 (c)-(e) on synthetic data, SimCLR, seeds 0 and 1 (demo-figures/)
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test demo demo-full demo-figures
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

demo-figures: setup
	DEMO_DIR=demo-figures FIGURES=yes SEEDS='0 1' scripts/demo

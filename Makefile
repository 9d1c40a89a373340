# make setup: install everything (scripts/setup) | make test: the test suite | make demo: the pipeline on synthetic data
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test demo
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock scripts/setup
	scripts/setup
	touch $@

test: setup
	python -m pytest

demo: setup
	scripts/demo

# Every target creates .venv when it is missing and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.offload-installed
MODEL ?=
ARGS ?=

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,models,bench,distributed]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(PY) -m offload.demo $(MODEL) $(ARGS)

bench: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider bench --benchmark-enable --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info

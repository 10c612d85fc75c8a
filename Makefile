# dgkit: `make train` (install + quick start run) and `make test` (install + test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The install stamp is keyed on pyproject.toml's content: a second `make test` does not reinstall.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install train test lint bench data

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(PY) train.py +exp=quickstart

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

data: $(STAMP)
	$(PY) scripts/prepare_embedded.py

# Speed ratios (dgkit vs a plain loop, loader vs model, each objective vs ERM) against docs/bench_ratios.json;
# a drop of more than 15 % is reported. BENCH_ARGS=--save makes the figures the new baseline.
bench: $(STAMP)
	$(PY) scripts/bench_ratios.py $(BENCH_ARGS)

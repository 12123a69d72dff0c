# Two commands set everything up on a fresh machine with Python 3.11 and make:
#   make run    create .venv and run the default sDPO pipeline (tiny model, shipped data)
#   make test   create .venv with the test extras, lint, and run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip command as everything else, so pip keeps the CPU build.
TORCH := torch==2.13.0
# Every other package at the version the tests passed with (`make lock` regenerates it).
LOCK := requirements/cpu.lock
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q -c $(LOCK) $(TORCH)

.PHONY: run test lint format bench serve clean ui-mlflow ui-prefect experiment

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP_INSTALL) -e ".[test]"
	touch $@ $(VENV)/.installed-run

# Regenerate the lock from pyproject.toml (all extras, Python 3.11, Linux) with uv, then commit it.
# torch is left to pyproject.toml's pin: its build (CPU, CUDA) depends on the index an install uses,
# and the CPU wheel's find-links keep CUDA-only packages (nvidia-*, triton) out of the lock.
UV_VERSION := 0.13.9
TORCH_FIND_LINKS ?= $(if $(wildcard /opt/wheels/torch-*),/opt/wheels,https://download.pytorch.org/whl/cpu/torch/)
.PHONY: lock
lock: | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --extra test --extra convert --extra harness --python-version 3.11 \
	  --find-links $(TORCH_FIND_LINKS) --no-emit-package torch --custom-compile-command "make lock" \
	  $(UV_ARGS) -o $(LOCK)

run: $(VENV)/.installed-run
	HF_HUB_OFFLINE=1 $(BIN)/sdpo run --config recipes/default.yaml $(ARGS)

# Does stepwise help? sDPO against plain DPO and controls, 3 seeds each (recipes/experiments/default.yaml).
experiment: $(VENV)/.installed-run
	HF_HUB_OFFLINE=1 $(BIN)/sdpo experiment --config recipes/experiments/default.yaml $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The test tiers (markers set in tests/conftest.py): unit for the edit loop (under a minute, no lint),
# then integration and e2e. `make test` runs all three.
.PHONY: test-fast test-integration test-e2e

test-fast: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m unit $(PYTEST_ARGS)

test-integration: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m integration $(PYTEST_ARGS)

test-e2e: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m e2e $(PYTEST_ARGS)

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# DPO step throughput and memory against TRL's DPOTrainer (needs the test extras: trl).
bench: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.dpo_step $(ARGS)

# The CPU suite's core tests under the lent GPU machine's versions (requirements/device-versions.txt:
# torch 2.11, transformers 5.17; Python 3.12 where one is found, as on the device), every other
# package at the lock's version. Not part of `make test`: torch 2.11's PyPI wheel is a CUDA build
# of several GB. DEVICE_TESTS picks the tests (benchmarks/README.md has the last result).
DEVICE_VENV := .venv-device
DEVICE_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(PYTHON))
DEVICE_TESTS ?= tests/sdpo_core tests/benchmarks
.PHONY: test-device-versions
# pyproject.toml pins torch 2.13: its other requirements (and the test extra's) are installed beside
# the device's pins, then the project itself without its requirements.
$(DEVICE_VENV)/.installed: pyproject.toml $(LOCK) requirements/device-versions.txt
	rm -rf $(DEVICE_VENV)
	$(DEVICE_PYTHON) -m venv $(DEVICE_VENV)
	grep -vE '^(transformers|setuptools)==' $(LOCK) >$(DEVICE_VENV)/constraints.txt
	$(DEVICE_VENV)/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  print(*(d for d in p["dependencies"] + p["optional-dependencies"]["test"] if not d.startswith("torch")), sep="\n")' \
	  >$(DEVICE_VENV)/project-requirements.txt
	$(DEVICE_VENV)/bin/pip install --disable-pip-version-check -q -c $(DEVICE_VENV)/constraints.txt \
	  -r requirements/device-versions.txt -r $(DEVICE_VENV)/project-requirements.txt
	$(DEVICE_VENV)/bin/pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

test-device-versions: $(DEVICE_VENV)/.installed
	$(DEVICE_VENV)/bin/python -c 'import sys, torch, transformers, trl; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'
	HF_HUB_OFFLINE=1 $(DEVICE_VENV)/bin/python -m pytest -q -p no:cacheprovider $(DEVICE_TESTS) $(PYTEST_ARGS)

# The wheels the lent GPU machine lacks for the benchmark (trl, datasets, pydantic and theirs), for
# CPython 3.12, into benchmarks/wheels (ignored), at most 56 MiB: benchmarks/carry_wheels.py.
.PHONY: wheels
wheels: | $(BIN)/python
	$(BIN)/python -m benchmarks.carry_wheels

ui-mlflow: $(VENV)/.installed-run
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(or $(SDPO_HOME),.sdpo)/mlflow.db

ui-prefect: $(VENV)/.installed-run
	mkdir -p $(abspath $(or $(SDPO_HOME),.sdpo))/prefect
	PREFECT_HOME=$(abspath $(or $(SDPO_HOME),.sdpo))/prefect $(BIN)/prefect server start

# A local Prefect server, the two work pools, the S3 credentials block type, the deployments and a
# process worker for each pool: start runs from the UI at http://127.0.0.1:4200. Stop with Ctrl-C.
serve: $(VENV)/.installed-run
	mkdir -p $(abspath $(or $(SDPO_HOME),.sdpo))/prefect
	PREFECT_HOME=$(abspath $(or $(SDPO_HOME),.sdpo))/prefect PREFECT_API_URL=http://127.0.0.1:4200/api \
	SDPO_PROJECT_DIR=$(CURDIR) PATH=$(abspath $(BIN)):$$PATH bash deployments/serve.sh

# Turn on the deployments' schedules (all off by default: deployments/prefect.yaml) on the server
# that `make serve` started; DEPLOYMENT=flow/deployment for one only, e.g.
# `make schedule-on DEPLOYMENT=sdpo_pipeline/sdpo-pipeline`. `make schedule-off` pauses them again.
# Schedules already in the wanted state are left alone (Prefect refuses to pause a paused one).
# Order-only: the server's environment is there already; this never reinstalls it.
.PHONY: schedule-on schedule-off
schedule-on schedule-off: | $(VENV)/.installed-run
	@export PREFECT_API_URL=$(or $(PREFECT_API_URL),http://127.0.0.1:4200/api); \
	action=$(if $(filter schedule-on,$@),resume,pause); \
	if [ -z "$(DEPLOYMENT)" ]; then $(BIN)/prefect --no-prompt deployment schedule $$action --all; \
	else for id in $$($(BIN)/prefect deployment schedule ls "$(DEPLOYMENT)" -o json \
	    | $(BIN)/python -c 'import json, sys; on = sys.argv[1] == "resume"; print(*(s["id"] for s in json.load(sys.stdin) if s.get("active") != on))' $$action); do \
	  $(BIN)/prefect --no-prompt deployment schedule $$action "$(DEPLOYMENT)" $$id || exit 1; done; fi

clean:
	rm -rf .sdpo .pytest_cache .ruff_cache

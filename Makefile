# `make demo` and `make test` work on a fresh clone: they create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch lies on disk here; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install demo test lint typecheck pytest crds bench clean

$(STAMP): pyproject.toml Makefile
	@# Prometheus server + promtool (Debian) for the alert-rule and scrape tests.
	command -v promtool >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[operator,trainer,deepspeed,dev]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/crucible validate examples/
	$(BIN)/crucible run examples/quickstart/ --workdir .crucible/quickstart

test: install
	$(MAKE) lint typecheck pytest

lint: install
	$(BIN)/ruff check operator trainer tests bench

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q tests

crds: install
	$(BIN)/crucible crds --out crds/

bench: install
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/posttrain_sft.py
	$(BIN)/python bench/posttrain_dpo.py
	$(BIN)/python bench/operator_scale.py

clean:
	rm -rf $(VENV) .crucible .pytest_cache .mypy_cache .ruff_cache

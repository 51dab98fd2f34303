# Two commands matter: `make book` and `make test`. Both create .venv/ (inside the repo) on first use
# and install torch (TORCH_SPEC) unless it is there already. From PyPI, torch on Linux is the CUDA build
# (GBs); on a machine without a GPU, take the CPU build from PyTorch's own index:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (CI's machines have the CPU build on local disk.) Or use an environment you already have:
# `make test PY=python3` (installs the package and its extras into that python, leaves .venv/ alone).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= book,test,grade,dev,hf
# the marker that setup has run, kept next to the python it installed into
STAMP := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed,_build/.installed-$(subst /,_,$(PY)))
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
OUT ?= _build/gpu-check

.PHONY: setup book test test-kernels test-notebooks notebooks exercises handouts grade bench gpu-check lint browser clean

# Idempotent: re-runs the install only when pyproject.toml changes.
setup: $(STAMP)
$(STAMP): pyproject.toml
	@if [ "$(PY)" = "$(VENV)/bin/python" ] && [ ! -x "$(PY)" ]; then $(PYTHON) -m venv $(VENV); fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

book: setup
	$(PY) -c "from jupyter_book.cli.main import main; main()" build . -W -n --keep-going
	@echo "site: _build/html/index.html"

# Headless Chromium for the browser test (Debian's package; the browser's own download does not work offline).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "the browser test needs Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver"; exit 1; fi; }

test: setup browser
	$(PY) -m pytest -q -p no:cacheprovider tests $(NOTEBOOKS) $(NBVAL)

test-kernels: setup
	$(PY) -m pytest -q -p no:cacheprovider tests -k "not book and not exercises"

test-notebooks: setup
	$(PY) -m pytest -q -p no:cacheprovider $(NOTEBOOKS) $(NBVAL)

# The only way committed notebook outputs change: execute every notebook in place. Widget state is then
# dropped: the site shows static renderings of the controls and loads no widget code.
notebooks: setup
	@for nb in $(NOTEBOOKS); do echo "executing $$nb"; \
	  $(PY) -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 "$$nb" \
	  && $(PY) tools/strip_widget_state.py "$$nb" || exit 1; done

# Student and autograder versions of every exercise (generated, not committed).
exercises: setup
	@for d in exercises/*/; do n=$$(basename $$d); \
	  $(PY) -m otter assign "$$d$$n.ipynb" "_build/exercises/$$n" || exit 1; done
	@echo "student notebooks: _build/exercises/*/student/, autograders: _build/exercises/*/autograder/"

# What students get: each chapter's student notebook and a zip of it, and the autograder zips for
# Gradescope (book/instructors.md).
handouts: setup
	$(PY) tools/handouts.py _build/handouts --zip
	@echo "student notebooks and zips: _build/handouts/, autograders: _build/handouts/autograder/"

# Batch grading without Docker: make grade EXERCISE=ch01_flashattention SUBMISSIONS=folder [SCORES=scores.csv]
grade: handouts
	@test -n "$(EXERCISE)" -a -n "$(SUBMISSIONS)" || { echo "usage: make grade EXERCISE=<exercise folder name> SUBMISSIONS=<folder of .ipynb or .zip> [SCORES=scores.csv]"; exit 2; }
	$(PY) tools/grade_batch.py _build/handouts/autograder/$(EXERCISE)-autograder.zip $(SUBMISSIONS) $(or $(SCORES),scores.csv)

bench:
	$(PY) -m minikernels.bench --op all

# What runs on the GPU machine: kernel tests (bf16 included), nbval on every notebook, the benchmarks.
# Every step runs even if an earlier one fails; logs and JSON go under $(OUT). Uses the python it is
# given (PY=python3 there: no venv, no installs).
gpu-check:
	@mkdir -p $(OUT); status=0; \
	$(PY) -m pytest -q -p no:cacheprovider tests -k "not book and not exercises and not environment" \
	  > $(OUT)/tests.log 2>&1 || status=1; tail -3 $(OUT)/tests.log; \
	$(PY) -m pytest -q -p no:cacheprovider $(NOTEBOOKS) $(NBVAL) > $(OUT)/nbval.log 2>&1 || status=1; \
	tail -3 $(OUT)/nbval.log; \
	$(PY) -m minikernels.bench --op all --json-dir $(OUT) > $(OUT)/bench.log 2>&1 || status=1; \
	cat $(OUT)/bench.log; exit $$status

lint: setup
	$(PY) -m ruff check minikernels tests notebooks exercises tools book/_ext

clean:
	rm -rf _build

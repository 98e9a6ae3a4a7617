# moelab: every target makes .venv on first use, then reuses it.
#
#   make lab     JupyterLab on notebooks/
#   make test    ruff over the whole tree, then the whole suite (unit tests, every notebook run
#                through nbclient, the browser test)
#   make bench   benchmarks/bench_layer.py, bench_inference.py and bench_train.py -> RESULTS.md
#   make tour    run notebooks/00_tour.ipynb headless into build/
#   make lint    ruff
#   make clean   remove build outputs and caches (keeps .venv; `make distclean` removes it too)
#
# Installs are remembered by stamp files inside .venv that depend on pyproject.toml: a second
# run skips pip, and editing pyproject.toml re-installs.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check --quiet
# torch is pinned and installed first, before anything that depends on it. Which build pip gets
# depends on where it looks: on a stock Linux pip, PyPI's torch is the multi-GB CUDA build. So pip
# also looks in TORCH_INDEX, PyTorch's CPU-only wheels by default, and takes the CPU build from
# there (its version, 2.13.0+cpu, ranks above PyPI's 2.13.0). For a CUDA build, point TORCH_INDEX
# at PyTorch's CUDA index (make TORCH_INDEX=https://download.pytorch.org/whl/cu128 venv) or clear
# it to take PyPI's (make TORCH_INDEX= venv); TORCH may also name a wheel file
# (make TORCH=/path/to/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl venv).
TORCH       ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# pip is pointed at TORCH_INDEX only where that index answers (checked when pip runs): on a
# machine without internet access, or with a package mirror of its own (CI's), pip would
# otherwise retry the unreachable index for every package it installs (it cost CI 20 minutes).
TORCH_PIP    = $$($(PY) -c "import sys, urllib.request as r; url = sys.argv[1].rstrip('/'); \
	r.urlopen(url + '/torch/', timeout=5) if url else sys.exit(1); print('--extra-index-url', url)" \
	"$(TORCH_INDEX)" 2>/dev/null || echo "TORCH_INDEX '$(TORCH_INDEX)' not used (unset or no \
	answer): torch comes from pip's own index" >&2)

ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help lab test bench tour lint clean distclean venv

help:
	@echo "make lab    JupyterLab on notebooks/ (first run installs .venv, ~3 min)"
	@echo "make test   ruff, then the whole test suite with MOELAB_PRESET=smoke (pytest args: ARGS=...)"
	@echo "make bench  benchmarks (layer, training): tables into benchmarks/RESULTS.md"
	@echo "make tour   execute notebooks/00_tour.ipynb headless into build/"
	@echo "make lint   ruff check"
	@echo "make clean  remove build outputs and caches; make distclean also removes .venv"

# --- the virtual environment -------------------------------------------------------------------

$(VENV)/pyvenv.cfg:
	@test -n "$(PYTHON)" || { echo "need python3.11 (or python3) on PATH" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-torch: $(VENV)/pyvenv.cfg
	$(PIP) install $(TORCH_PIP) "$(TORCH)"
	@touch $@

$(VENV)/.stamp-lab: pyproject.toml $(VENV)/.stamp-torch
	$(PIP) install $(TORCH_PIP) "$(TORCH)" -e ".[lab,kernels]"
	@touch $@

# dev is a superset of lab, so it satisfies the lab stamp too. The peers (DeepSpeed,
# transformers) come with it for the benchmarks and the parity tests; DS_BUILD_OPS=0 installs
# DeepSpeed without compiling its ops.
$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-torch
	DS_BUILD_OPS=0 $(PIP) install $(TORCH_PIP) "$(TORCH)" -e ".[lab,kernels,dev,peers]"
	@touch $@ $(VENV)/.stamp-lab

venv: $(VENV)/.stamp-dev

# --- targets -----------------------------------------------------------------------------------

lab: $(VENV)/.stamp-lab
	$(VENV)/bin/jupyter lab notebooks/

# ruff first: it takes a second, and a lint error fails the run before the suite starts.
test: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check .
	MOELAB_PRESET=smoke $(PY) -m pytest $(ARGS)

bench: $(VENV)/.stamp-dev
	$(PY) benchmarks/bench_layer.py $(ARGS)
	$(PY) benchmarks/bench_inference.py --out benchmarks/RESULTS.md
	$(PY) benchmarks/bench_train.py --steps 300 --out benchmarks/RESULTS.md

tour: $(VENV)/.stamp-lab
	@mkdir -p build
	$(VENV)/bin/jupyter nbconvert --to notebook --execute notebooks/00_tour.ipynb \
		--output-dir build/ --ExecutePreprocessor.timeout=900
	@echo "executed notebook: build/00_tour.ipynb"

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf build/ .pytest_cache/ .ruff_cache/ .hypothesis/ *.egg-info/
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) \
		-type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

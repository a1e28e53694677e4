# epmoe — two commands: `make train` and `make test`. Each sets everything up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Pinned: a CPU wheel of exactly this version is on the build machines; any other version
# or range pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
# What ruff checks; `make test` runs `ruff check` on it first, so a lint error cannot land.
LINTED := epmoe comm launch tests benchmarks

.PHONY: help install train test bench lint clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 10

install: $(STAMP)  ## create .venv with torch and epmoe[dev] (quick when already done)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: install  ## the main job: 2-rank expert-parallel training on the built-in corpus (ARGS=overrides)
	$(PY) -m epmoe.launch experiment=ep2_cpu $(ARGS)

test: install  ## ruff check, then the test suite (CPU, a few minutes)
	$(VENV)/bin/ruff check $(LINTED)
	$(PY) -m pytest -q tests $(ARGS)

bench: install  ## benchmarks: layer vs dense floor; EP=2 overlap on loopback and a shaped 1 Gbit/s link; vs DeepSpeed-MoE; the step outside the MoE layers; a ~1B Hugging Face import at EP=2; per-rank memory replicated vs FSDP2 and with activation checkpointing; dense -> MoE upcycling vs scratch
	$(PY) -m benchmarks.layer --steps 3 --warmup 1 $(ARGS)
	$(PY) -m benchmarks.overlap --link all --steps 3 --warmup 1 --bf16-chunks 4
	$(PY) -m benchmarks.peers --steps 5 --warmup 1
	$(PY) -m benchmarks.step_overhead --steps 20 --warmup 3
	$(PY) -m benchmarks.memory --steps 3
	$(PY) -m benchmarks.train_step --steps 10 --warmup 2
	$(PY) -m benchmarks.hf_import
	$(PY) -m benchmarks.generate
	$(PY) -m benchmarks.upcycle --dense-steps 600 --steps 300

lint: install  ## ruff check and ruff format --check
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) outputs multirun

# Two commands do everything on a fresh machine:
#   make train   -> virtualenv, synthetic shards, pretrain the default tiny model, print its evaluation
#   make test    -> virtualenv, lint (ruff), types (mypy), layer contracts, the whole pytest suite
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
VLPT := $(VENV)/bin/vlpt
DATA ?= data/synthetic

.PHONY: venv train data test lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

$(DATA)/info.json: | venv
	$(VLPT) data synth $(DATA) --seed 0

data: $(DATA)/info.json

train: venv data
	$(VLPT) pretrain configs/pretrain/synthetic-tiny.yaml

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks datasets
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

bench: venv data
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs data/synthetic

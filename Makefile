# Two entry points (see README): `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data/synthetic
SCENES ?= 10
MODEL ?= detr3d_r50
WORKDIR ?= runs/$(MODEL)_demo
DEMO_ARGS ?=

.PHONY: venv demo test test-slow test-all clean-data

venv: $(STAMP)

# nuscenes-devkit 1.2.0 pins numpy<2 (jax needs numpy>=2): its real dependencies are in
# pyproject.toml and the devkit itself is installed without its pins.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps nuscenes-devkit==1.2.0
	touch $(STAMP)

# The main job: synthetic set -> data checks and pictures -> train the demo detector (resumes if
# WORKDIR holds a checkpoint) -> devkit evaluation (NDS table).
demo: venv
	test -f $(DATA)/v1.0-mini/sample.json || $(PY) -m fd3d_jax.data.synthetic --out $(DATA) --scenes $(SCENES) --seed 0
	$(PY) experiments/data_demo.py --config configs/data.py:toy --config.data.dataroot=$(DATA) --out data/demo
	$(PY) -m fd3d_jax.train --config configs/$(MODEL).py:demo --workdir $(WORKDIR) --config.data.dataroot=$(DATA) $(DEMO_ARGS)

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

test-all: venv
	$(PY) -m pytest -q -m 'slow or not slow'

clean-data:
	rm -rf data

# Two entry points (see README): `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data/synthetic40
SCENES ?= 40
TRAINVAL = --config.data.dataroot=$(DATA) --config.data.version=v1.0-trainval --config.data.train_split=train --config.data.val_split=val
MODEL ?= detr3d_r50
WORKDIR ?= runs/$(MODEL)_demo
EXPERT ?= bevformer_base
EXPERT_STEPS ?= 3000
DEMO_ARGS ?=

.PHONY: venv data bench-data demo expert detector-demo data-demo bench bench-device test test-slow test-all clean-data

venv: $(STAMP)

# nuscenes-devkit 1.2.0 pins numpy<2 (jax needs numpy>=2): its real dependencies are in
# pyproject.toml and the devkit itself is installed without its pins.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps nuscenes-devkit==1.2.0
	touch $(STAMP)

# The synthetic nuScenes-format set of the experiments (40 scenes: v1.0-trainval, 32 train / 8 val).
data: venv
	test -f $(DATA)/fd3d_synthetic.json || $(PY) -m fd3d_jax.data.synthetic --out $(DATA) --scenes $(SCENES) --seed 0

# The main job: the short table 1 (BEVFormer base -> tiny on the synthetic set, from the committed demo
# expert): the apprentice alone and with FD3D, trained, evaluated with the devkit, NDS table printed.
# The full tables: python experiments/distill_table.py --table table1|table2|table3 (docs/experiments.md).
demo: data
	$(PY) experiments/distill_table.py --table table1 --short --dataroot $(DATA)

# Trains a demo expert on the synthetic set and exports it to experiments/experts/ (how the committed
# one was made): make expert [EXPERT=bevformer_base|detr3d_r101] [EXPERT_STEPS=3000]
expert: data
	$(PY) -m fd3d_jax.train --config configs/$(EXPERT).py:demo --workdir runs/expert_$(EXPERT)_demo $(TRAINVAL) \
		--config.train.num_steps=$(EXPERT_STEPS)
	$(PY) experiments/export_expert.py --workdir runs/expert_$(EXPERT)_demo --out experiments/experts/$(EXPERT)_demo

# One detector alone on the synthetic set (docs/training.md).
detector-demo: data
	$(PY) -m fd3d_jax.train --config configs/$(MODEL).py:demo --workdir $(WORKDIR) $(TRAINVAL) $(DEMO_ARGS)

# The data path check: devkit tables -> records -> batches, GT through DetectionEval, pictures.
data-demo: data
	$(PY) experiments/data_demo.py --config configs/data.py:toy $(TRAINVAL) --out data/demo

# Benchmarks (torch, installed by the venv's test extra, is the reference of bench_msda): results in
# experiments/results/bench_*.json
# The benchmarks time real batches of the 10-scene set (v1.0-mini), the configs' default dataroot.
BENCH_DATA := data/synthetic

bench-data: venv
	test -f $(BENCH_DATA)/fd3d_synthetic.json || $(PY) -m fd3d_jax.data.synthetic --out $(BENCH_DATA) --scenes 10 --seed 0

bench: bench-data data
	$(PY) experiments/bench_msda.py --shapes tiny_sca tiny_tsa base_tsa base_sca --queries 2500
	$(PY) experiments/bench_train_step.py --dataroot $(BENCH_DATA)
	$(PY) experiments/bench_pipeline.py --config configs/bevformer_tiny.py:demo
	$(PY) experiments/bench_pipeline.py --config configs/detr3d_r50.py:demo
	$(PY) experiments/bench_inference.py --config configs/bevformer_tiny.py:demo
	$(PY) experiments/bench_inference.py --config configs/detr3d_r50.py:demo
	$(PY) experiments/bench_inference.py --config configs/bevformer_base.py:demo --frames 10 --warmup 2
	$(PY) experiments/bench_inference.py --config configs/bevformer_tiny.py:full --frames 3 --warmup 1
	$(PY) experiments/bench_memory.py
	$(PY) experiments/bench_matcher.py --out
	$(PY) experiments/bench_compile_cache.py --config configs/fd3d_bevformer_base_to_tiny.py:demo
	$(PY) experiments/bench_sca.py --configs bevformer_tiny:demo bevformer_tiny:full --time bevformer_tiny:demo
	$(PY) experiments/bench_sca.py --configs bevformer_tiny:full --time bevformer_tiny:full --iters 3 --name bench_sca_tiny_full
	$(PY) experiments/bench_backbone.py --config bevformer_tiny:full --iters 2 --warmup 0
	$(PY) experiments/bench_memory.py --dtypes float32 bfloat16
	$(PY) experiments/bench_precision.py
	$(PY) experiments/precision_gradients.py --batches 6 --dataroot $(DATA)
	$(PY) experiments/bench_compile.py --config bevformer_tiny:full
	$(PY) experiments/sca_camera_hits.py --out

# Every accelerator figure in one command on one GPU, inside an 8-minute budget (docs/benchmarks.md): MSDA at the
# BEVFormer shapes, batch-1 FPS of BEVFormer tiny/small/base and train steps of tiny/base (dense and sparse SCA),
# float32 and bfloat16 -> experiments/results/bench_device_<backend>.json. No venv prerequisite: run it with the
# Python that has the accelerator's JAX, e.g. make bench-device PY=python3 [BENCH_DEVICE_ARGS=--keep-existing]
BENCH_DEVICE_ARGS ?=

bench-device:
	$(PY) -m experiments.bench_device --budget-s 480 $(BENCH_DEVICE_ARGS)

# Two pytest-xdist workers (CI has 2 cores): the default suite takes ~10 minutes instead of ~15; then
# the scale-out/reliability tests (kill/SIGTERM and resume, 2 processes vs 1), which start their own processes.
test: venv
	$(PY) -m pytest -q -n 2
	$(PY) -m pytest -q -m scaleout

test-slow: venv
	$(PY) -m pytest -q -m slow

test-all: venv
	$(PY) -m pytest -q -m 'slow or not slow'

clean-data:
	rm -rf data

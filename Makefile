# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OCCBENCH := $(VENV)/bin/occbench
export PYOPENGL_PLATFORM ?= egl

.PHONY: venv demo test bench clean demo-weights browser

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m occbench.demo

# The report test opens the HTML report in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the report test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: venv browser
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) reports/*/ .pytest_cache

# Demo weights (bundled: occbench/assets/pare_demo.pt + .json): PARE (ResNet-18 cut after layer3, 96 px)
# trained on a synthetic stand-in training set (seed 1; the demo set's seed differs, so it stays held out).
# Phase 1: random synthetic occluders on half the samples; phase 2 fine-tunes without occluders at a lower
# learning rate. About an hour on a 2-core CPU. The committed file comes from this target with these defaults.
DEMO_TRAIN_N ?= 3000
DEMO_TRAIN_SEED ?= 1
DEMO_TRAIN_DIR ?= build/demo_train
STEPS ?= 2000
STEPS2 ?= 3000
STEPS3 ?= 5000
DEMO_TRAIN = $(OCCBENCH) train --model pare-demo --dataset $(DEMO_TRAIN_DIR) --batch-size 16 --threads 1 --half
demo-weights:
	test -x $(OCCBENCH) || $(MAKE) venv
	test -f $(DEMO_TRAIN_DIR)/dataset.json || $(OCCBENCH) datasets make-synthetic --n $(DEMO_TRAIN_N) \
		--seed $(DEMO_TRAIN_SEED) --name demo-train --out $(DEMO_TRAIN_DIR)
	$(DEMO_TRAIN) --steps $(STEPS) --lr 3e-4 --seed 0 --occluder-prob 0.5 --out build/pare_demo_phase1.pt
	$(DEMO_TRAIN) --steps $(STEPS2) --lr 1e-4 --seed 1 --occluder-prob 0 \
		--init-checkpoint build/pare_demo_phase1.pt --out build/pare_demo_phase2.pt
	$(DEMO_TRAIN) --steps $(STEPS3) --lr 1e-4 --seed 2 --occluder-prob 0 \
		--init-checkpoint build/pare_demo_phase2.pt --out occbench/assets/pare_demo.pt
	rm -f build/pare_demo_phase1.pt.state build/pare_demo_phase2.pt.state occbench/assets/pare_demo.pt.state

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
# trained from scratch on a synthetic stand-in training set (24000 samples, seed 1, generator
# occbench-synthetic-2: the folder name carries the version so an older set is never reused; the demo
# set's seed differs, so it stays held out): 10000 steps of batch 16, Adam, peak lr 1e-3 with cosine decay, no
# synthetic occluders. About 6.5 min of rendering + 1.5 min of loading + 60 min of training on this 2-core
# CPU (one thread, so the run is reproducible step for step). The committed file comes from this command.
DEMO_TRAIN_N ?= 24000
DEMO_TRAIN_SEED ?= 1
DEMO_TRAIN_DIR ?= build/demo_train_v2
DEMO_STEPS ?= 10000
demo-weights:
	test -x $(OCCBENCH) || $(MAKE) venv
	test -f $(DEMO_TRAIN_DIR)/dataset.json || $(OCCBENCH) datasets make-synthetic --n $(DEMO_TRAIN_N) \
		--seed $(DEMO_TRAIN_SEED) --name demo-train --out $(DEMO_TRAIN_DIR)
	$(OCCBENCH) train --model pare-demo --dataset $(DEMO_TRAIN_DIR) --batch-size 16 --threads 1 --half \
		--lr 1e-3 --lr-schedule cosine --occluder-prob 0 --seed 0 --steps $(DEMO_STEPS) \
		--out occbench/assets/pare_demo.pt
	rm -f occbench/assets/pare_demo.pt.state

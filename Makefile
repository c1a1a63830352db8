# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OCCBENCH := $(VENV)/bin/occbench
export PYOPENGL_PLATFORM ?= egl

.PHONY: venv demo test bench clean demo-weights

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

test: venv
	$(PY) -m pytest -q -x tests

clean:
	rm -rf $(VENV) reports/*/ .pytest_cache

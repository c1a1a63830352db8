"""occbench: occlusion-robustness benchmark for 3D human pose-and-shape (SMPL) regressors.

Notebook entry points (imported lazily, so ``import occbench`` is cheap)::

    import occbench
    model = occbench.load_model("pare", weights="random")
    run_dir = occbench.benchmark(model="pare", protocol="advocc80", dataset="demo", weights="random")
    run = occbench.load_run(run_dir)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "occbench.zoo",
    "wrap_model": "occbench.adapters",
    "Outputs": "occbench.adapters",
    "model_names": "occbench.models",
    "load_body_model": "occbench.body",
    "open_dataset": "occbench.data",
    "load_protocol": "occbench.protocol",
    "benchmark": "occbench.engine",
    "run_protocol": "occbench.engine",
    "merge_runs": "occbench.merge",
    "ScaleOut": "occbench.parallel",
    "load_run": "occbench.results",
    "compare_runs": "occbench.results",
    "write_report": "occbench.report",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'occbench' has no attribute {name!r}")

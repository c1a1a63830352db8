"""The model zoo: name -> how to build the model and where its official checkpoint comes from.

Nothing here imports torch or builds a network; :func:`load_model` imports the one module it needs.
Each entry is one readable record; the architecture code lives in the module its ``builder`` names.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    builder: str                      # "occbench.models.<module>:<function>", called with **options
    input_size: int = 224
    options: dict = field(default_factory=dict)          # default architecture options
    checkpoint_files: tuple = ()      # official file names, looked up in OCCBENCH_CHECKPOINT_DIR
    checkpoint_source: str = ""       # where a user downloads them
    checkpoint_format: str = ""       # "lightning" | "model-dict" | "mmcv" | "occbench"
    strip_prefixes: tuple = ()        # prefixes removed from the checkpoint keys
    known_unused: tuple = ()          # regexes of stored keys that inference does not use
    manifest: str = ""                # official layout file in models/manifests
    paper: str = ""
    license: str = ""


ZOO: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    ZOO[entry.name] = entry
    return entry


def model_names() -> list[str]:
    _load_entries()
    return sorted(ZOO)


def get_entry(name: str) -> ModelEntry:
    _load_entries()
    if name not in ZOO:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(sorted(ZOO))}")
    return ZOO[name]


def build_model(name: str, mean_params: dict | None = None, **options):
    """The network with random weights (architecture only, no body model, no checkpoint).

    mean_params: SPIN's smpl_mean_params.npz as a dict (pose (144,), shape (10,), cam (3,)); None takes
    :func:`occbench.body.load_mean_params` (the stand-in's when the user has no SPIN data folder).
    """
    entry = get_entry(name)
    module_name, func_name = entry.builder.split(":")
    builder = getattr(importlib.import_module(module_name), func_name)
    return builder(mean_params=mean_params, **{**entry.options, **options})


def _load_entries() -> None:
    if not ZOO:
        importlib.import_module("occbench.models.entries")

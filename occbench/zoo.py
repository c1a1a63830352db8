"""``load_model``: a zoo entry + the user's checkpoint + the body model -> a ready ``ZooModel``."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from occbench.assets import MissingAssetError, find_checkpoint_file
from occbench.errors import UserError
from occbench.models import get_entry


def find_checkpoint(name: str, checkpoint_dir=None) -> Path:
    """The official checkpoint of zoo model ``name`` (see :func:`occbench.assets.find_checkpoint_file`)."""
    entry = get_entry(name)
    found, folder = find_checkpoint_file(entry.checkpoint_files, checkpoint_dir)
    if found is not None:
        return found
    raise MissingAssetError(
        f"model {name!r}: no checkpoint ({' or '.join(entry.checkpoint_files)}) in {folder}; "
        f"get it from {entry.checkpoint_source}, put it there or pass --checkpoint FILE "
        f"(or --weights random for a smoke run)")


def training_sidecar(checkpoint) -> dict:
    """For a checkpoint written by ``occbench train``: {'trained_on', 'training'} from its FILE.json sidecar
    (how it was trained); {} when there is none."""
    import json

    sidecar = Path(str(checkpoint) + ".json")
    if not sidecar.is_file():
        return {}
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {}
    dataset = info.get("dataset")
    return {"trained_on": info.get("trained_on"), "training": {
        "sidecar": str(sidecar), "dataset": dataset.get("name") if isinstance(dataset, dict) else dataset,
        **{k: info.get(k) for k in ("model", "options", "steps", "seed", "batch_size", "lr", "occbench_version")}}}


def model_option_names(name: str) -> tuple[list[str], bool]:
    """(the options zoo model ``name``'s builder names, whether it also takes further keyword options)."""
    import importlib
    import inspect

    module_name, func_name = get_entry(name).builder.split(":")
    builder = getattr(importlib.import_module(module_name), func_name)
    params = inspect.signature(builder).parameters.values()
    named = [p.name for p in params if p.name != "mean_params" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def check_model_options(name: str, options: dict) -> None:
    """Refuse an option the model does not have (checked against its builder's signature; builders that
    pass further options on are checked when they are built, see :func:`build_with_options`)."""
    named, open_ended = model_option_names(name)
    unknown = sorted(set(options) - set(named))
    if unknown and not open_ended:
        raise UserError(f"--model-option/-o {unknown[0]}={options[unknown[0]]!r}: model {name!r} has no option "
                        f"{unknown[0]!r}; valid options: {', '.join(named) or 'none'}")


def build_with_options(name: str, mean_params, options: dict):
    """build_model, with an unknown or bad option as a one-line UserError naming it."""
    import re

    from occbench.models import build_model   # looked up at call time (tests replace it)

    try:
        return build_model(name, mean_params=mean_params, **options)
    except TypeError as err:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if not found or found.group(1) not in options:
            raise
        key = found.group(1)
        named, _ = model_option_names(name)
        raise UserError(f"--model-option/-o {key}={options[key]!r}: model {name!r} has no option {key!r} "
                        f"({err}); options of its builder: {', '.join(named) or 'none'}") from None
    except ValueError as err:
        if not options:
            raise
        raise UserError(f"--model-option/-o {', '.join(f'{k}={v!r}' for k, v in options.items())}: model "
                        f"{name!r} refuses it: {err}") from None


def load_model(name: str, checkpoint: str | os.PathLike | None = None, device=None, *,
               weights: str = "checkpoint", seed: int = 0, smpl_dir=None, data_dir=None,
               checkpoint_dir=None, allow_partial: bool = False, **options):
    """Build zoo model ``name``, load its weights and attach the neutral body model.

    weights: "checkpoint" (the official file: ``checkpoint`` or found in OCCBENCH_CHECKPOINT_DIR) or
    "random" (seeded initialisation, for tests and smoke runs; labelled in every result).
    The returned model has ``.provenance``: model, options, checkpoint path and sha256, weights, body model.
    """
    from occbench.body import load_body_model, load_mean_params
    from occbench.checkpoints import load_checkpoint_into

    from occbench.checks import check_seed, resolve_device

    try:
        entry = get_entry(name)
    except KeyError as err:
        raise UserError(str(err.args[0])) from None
    if weights not in ("checkpoint", "random"):
        raise UserError(f"--weights {weights!r}: valid: checkpoint, random")
    if weights == "random" and checkpoint is not None:
        raise UserError(f"--weights random with --checkpoint {checkpoint}: random weights ignore the checkpoint; "
                        "give one of them")
    check_seed(seed)
    check_model_options(name, options)
    device = resolve_device(device)
    body = load_body_model(smpl_dir=smpl_dir, data_dir=data_dir, gender="neutral")
    if weights == "checkpoint" and checkpoint is None:
        checkpoint = find_checkpoint(name, checkpoint_dir)
    torch.manual_seed(seed)
    model = build_with_options(name, load_mean_params(data_dir), options)
    provenance = {"model": name, "options": {**entry.options, **options}, "weights": weights,
                  "seed": seed, "checkpoint": None, "checkpoint_sha256": None}
    if weights == "checkpoint":
        report = load_checkpoint_into(model, checkpoint, strip_prefixes=entry.strip_prefixes,
                                      known_unused=entry.known_unused, allow_partial=allow_partial)
        provenance.update(checkpoint=str(checkpoint), checkpoint_sha256=report.sha256,
                          checkpoint_report=report.summary())
        provenance.update(training_sidecar(checkpoint))
        if provenance.get("trained_on"):
            model.crop_from = "canonical"   # `occbench train` feeds 224 px crops resampled to the input size
    # the explicit loader arguments, so that a worker rebuilding this model by name loads it the same way
    loader = {key: str(value) for key, value in (("smpl_dir", smpl_dir), ("data_dir", data_dir)) if value}
    if allow_partial:
        loader["allow_partial"] = True
    if loader:
        provenance["loader"] = loader
    model.attach_body_model(body)
    provenance["body_model"] = body.provenance
    model.provenance = provenance
    return model.to(device).eval()


"""``load_model``: a zoo entry + the user's checkpoint + the body model -> a ready ``ZooModel``."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from occbench.assets import MissingAssetError, asset_dir
from occbench.models import build_model, get_entry


def find_checkpoint(name: str, checkpoint_dir=None) -> Path:
    entry = get_entry(name)
    folder = asset_dir("OCCBENCH_CHECKPOINT_DIR", checkpoint_dir)
    for filename in entry.checkpoint_files:
        if (folder / filename).is_file():
            return folder / filename
    bundled = Path(__file__).resolve().parent / "assets"  # weights shipped in the package (the demo model)
    for filename in entry.checkpoint_files:
        if (bundled / filename).is_file():
            return bundled / filename
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

    entry = get_entry(name)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    body = load_body_model(smpl_dir=smpl_dir, data_dir=data_dir, gender="neutral")
    if weights not in ("checkpoint", "random"):
        raise ValueError(f"weights must be 'checkpoint' or 'random', not {weights!r}")
    if weights == "checkpoint" and checkpoint is None:
        checkpoint = find_checkpoint(name, checkpoint_dir)
    torch.manual_seed(seed)
    model = build_model(name, mean_params=load_mean_params(data_dir), **options)
    provenance = {"model": name, "options": {**entry.options, **options}, "weights": weights,
                  "seed": seed, "checkpoint": None, "checkpoint_sha256": None}
    if weights == "checkpoint":
        report = load_checkpoint_into(model, checkpoint, strip_prefixes=entry.strip_prefixes,
                                      known_unused=entry.known_unused, allow_partial=allow_partial)
        provenance.update(checkpoint=str(checkpoint), checkpoint_sha256=report.sha256,
                          checkpoint_report=report.summary())
        provenance.update(training_sidecar(checkpoint))
    model.attach_body_model(body)
    provenance["body_model"] = body.provenance
    model.provenance = provenance
    return model.to(device).eval()


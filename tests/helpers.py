"""Helpers shared by the test modules: random state dicts shaped like the official checkpoints, files written
the way the official code writes them, random mean parameters, and a tiny Pascal VOC folder."""
import argparse
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from occbench.checkpoints import _strip, container_object, read_manifest
from occbench.rotations import axis_angle_to_rotmat, rotmat_to_rot6d


def model_layout_from_manifest(tsv, strip_prefixes=(), known_unused=()) -> list[tuple[str, tuple, str]]:
    """The (key, shape, dtype) rows a zoo model's own ``state_dict()`` must have for this manifest: keys
    stripped of the container prefixes, known-unused keys removed (both as in ``load_checkpoint_into``)."""
    patterns = [re.compile(p) for p in known_unused]
    rows = []
    for key, shape, dtype in read_manifest(tsv):
        name, _ = _strip(key, strip_prefixes)
        if not any(p.search(key) or p.search(name) for p in patterns):
            rows.append((name, shape, dtype))
    return rows


def random_state_dict_from_manifest(tsv, seed: int = 0, strip_prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """A state dict with exactly the manifest's keys, shapes and dtypes, filled deterministically:
    floating tensors ~ N(0, 0.02^2), integer tensors small non-negative ints (0..9), bool tensors False;
    BatchNorm ``running_var`` = |N(0, 0.02^2)| + 0.5, so a forward pass with these weights stays finite.
    ``strip_prefix`` is removed from the keys that start with it."""
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape, dtype_name in read_manifest(tsv):
        dtype = getattr(torch, dtype_name)
        if dtype.is_floating_point:
            value = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            if key.endswith("running_var"):
                value = value.abs() + 0.5
        elif dtype == torch.bool:
            value = torch.zeros(shape, dtype=torch.bool)
        else:
            value = torch.randint(0, 10, shape, generator=generator).to(dtype)
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix):]
        state[key] = value
    return state


def save_in_official_container(state_dict: dict, path, container: str = "plain", prefix: str = "") -> Path:
    """Write ``state_dict`` (keys prefixed with ``prefix``) the way the official code saves it: the
    container of ``occbench.checkpoints.container_object`` plus what real files carry besides the weights.

    lightning: argparse hyper-parameters (so, as real .ckpt files, not loadable with weights_only);
    mmcv: numpy values in meta and an optimizer; model-dict: optimizer and step counters; plain: the bare dict.
    """
    obj = container_object(state_dict, container, prefix)
    if container == "lightning":
        obj.update(hparams_name="hparams", hyper_parameters=argparse.Namespace(lr=5e-5, backbone="test"))
    elif container == "mmcv":
        obj["meta"].update(epoch=1, iter=10, time="Thu Jan  1 00:00:00 2023", config="model = dict()",
                           hook_msgs={"best_score": np.float64(0.5)})
        obj["optimizer"] = {"state": {}, "param_groups": []}
    elif container == "model-dict":
        obj.update(optimizer={}, epoch=0, batch_idx=0, total_step_count=0)
    torch.save(obj, path)
    return Path(path)


def mean_params(seed: int = 0) -> dict:
    """Random SMPL mean parameters near the rest pose: 6D pose (144,), shape (10,), weak camera (3,)."""
    g = torch.Generator().manual_seed(seed)
    rot = axis_angle_to_rotmat(0.2 * torch.randn(24, 3, generator=g))
    return {"pose": rotmat_to_rot6d(rot).reshape(144), "shape": 0.1 * torch.randn(10, generator=g),
            "cam": torch.tensor([0.9, 0.01, -0.02])}


def fake_voc(root: Path) -> None:
    """A one-image Pascal VOC folder: a round chair (kept as an occluder) and a person (excluded)."""
    from PIL import Image
    for sub in ("JPEGImages", "Annotations", "SegmentationObject"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.full((100, 120, 3), 200, np.uint8)).save(root / "JPEGImages" / "a.jpg")
    labels = np.zeros((100, 120), np.uint8)
    yy, xx = np.mgrid[:100, :120]
    labels[(yy - 30) ** 2 + (xx - 30) ** 2 <= 20 ** 2] = 1      # a round chair in box (5, 5, 55, 55): kept
    labels[60:90, 60:110] = 2         # a person (excluded)
    Image.fromarray(labels).save(root / "SegmentationObject" / "a.png")
    objects = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><truncated>0</truncated><bndbox><xmin>{x0}</xmin>"
        f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in (("chair", (5, 5, 55, 55)), ("person", (60, 60, 110, 90))))
    (root / "Annotations" / "a.xml").write_text(f"<annotation>{objects}</annotation>")

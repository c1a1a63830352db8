"""The one sample type every dataset reader yields."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One person crop with its ground truth. Lengths in metres; 2D in canonical-crop pixels.

    sample_id: stable id, unique in the dataset (e.g. "downtown_walking_00/image_00120.jpg#0")
    crop: (224,224,3) uint8 RGB, the SPIN-style canonical crop (box side 200*scale px around center)
    center: (2,) box centre in the source image, px; scale: box side / 200
    joints3d: (14,3) GT LSP-14 joints, pelvis-subtracted (pelvis convention in Dataset.conventions), or None
    vertices: (6890,3) GT mesh with the same pelvis subtracted (for PVE), or None
    joints2d: (14,2) GT LSP-14 joints in crop pixels, or None
    joints2d_valid: (14,) bool, GT 2D known (independent of occluders and crop bounds)
    pose: (72,) SMPL axis-angle, betas: (10,), gender: 'neutral' | 'male' | 'female' (None if no SMPL GT)
    model_crop: (S,S,3) uint8 RGB, the same box cut at a model's input size S from the source image (asked for
        with ``Dataset.sample(i, model_input_size=S)``), or None
    """

    sample_id: str
    crop: np.ndarray
    center: np.ndarray
    scale: float
    joints3d: np.ndarray | None = None
    vertices: np.ndarray | None = None
    joints2d: np.ndarray | None = None
    joints2d_valid: np.ndarray | None = None
    pose: np.ndarray | None = None
    betas: np.ndarray | None = None
    gender: str | None = None
    image_path: str = ""
    meta: dict = field(default_factory=dict)
    model_crop: np.ndarray | None = None

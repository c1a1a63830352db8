"""Weak-perspective camera of SPIN/PARE/DaNet and projection to crop pixels.

The models predict ``cam = [s, tx, ty]`` for the 224 px canonical crop. SPIN and PARE turn it into a
perspective camera with focal length 5000 px: translation ``[tx, ty, 2 f / (224 s)]``, principal point at
the crop centre.
"""
from __future__ import annotations

import torch

FOCAL_LENGTH = 5000.0
CROP_SIZE = 224


def weak_perspective_to_translation(cam: torch.Tensor, focal_length: float = FOCAL_LENGTH,
                                    crop_size: int = CROP_SIZE) -> torch.Tensor:
    """(B,3) [s, tx, ty] -> (B,3) camera translation [tx, ty, 2 f / (crop_size s)]."""
    s, tx, ty = cam.unbind(-1)
    tz = 2.0 * focal_length / (crop_size * s.clamp_min(1e-9) + 1e-9)
    return torch.stack([tx, ty, tz], dim=-1)


def project_to_crop(points: torch.Tensor, cam: torch.Tensor, focal_length: float = FOCAL_LENGTH,
                    crop_size: int = CROP_SIZE) -> torch.Tensor:
    """Project (B,J,3) body-frame points with the weak-perspective camera (B,3) to (B,J,2) crop pixels.

    Pixel (0, 0) is the top-left corner of the ``crop_size`` crop, as in the image arrays.
    """
    trans = weak_perspective_to_translation(cam, focal_length, crop_size)
    p = points + trans[:, None, :]
    xy = focal_length * p[..., :2] / p[..., 2:3].clamp_min(1e-6)
    return xy + crop_size / 2.0

"""Weak-perspective camera of SPIN/PARE/DaNet and projection to crop pixels.

The models predict ``cam = [s, tx, ty]`` for the 224 px canonical crop. SPIN and PARE turn it into a
perspective camera with focal length 5000 px: translation ``[tx, ty, 2 f / (224 s)]``, principal point at
the crop centre. :func:`fit_weak_camera` fits the near-orthographic form of that camera to 2D joints.
"""
from __future__ import annotations

import numpy as np
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


def fit_weak_camera(points3d: np.ndarray, points2d: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares a, b with ``points2d ~= a * points3d[:, :2] + b`` (near-orthographic SPIN camera:
    a = 112 s, b = 112 (1 + s t)). points3d (J,3), points2d (J,2), valid (J,) -> (a, b (2,))."""
    xy, uv = points3d[valid, :2].astype(np.float64), points2d[valid].astype(np.float64)
    if len(xy) < 2:
        return 0.0, np.full(2, CROP_SIZE / 2.0)
    xc, uc = xy - xy.mean(0), uv - uv.mean(0)
    a = float((xc * uc).sum() / max((xc ** 2).sum(), 1e-12))
    return a, uv.mean(0) - a * xy.mean(0)

"""SPIN-style person crops: a square box of side ``200 * scale`` px around ``center``, resized to ``res``.

Coordinates are continuous pixel coordinates with pixel centres at integers (OpenCV's convention), in both
the source image and the crop. SPIN's own ``transform()`` rounds to integers and adds 1; occbench keeps the
exact affine map instead, so a GT joint lands on the sub-pixel position the crop really shows.

One crop is one ``cv2.warpAffine`` with the 2x3 matrix of :func:`crop_transform`. When the box is more
than 2x larger than the crop, the image is first shrunk with area averaging so the crop is not aliased.
Pixels outside the source image are black (0), as in SPIN.
"""
from __future__ import annotations

import cv2
import numpy as np

CROP_SIZE = 224
BOX_UNIT = 200.0  # SPIN: box side = 200 * scale px
DEFAULT_BBOX_FACTOR = 1.2  # SPIN's 3DPW preprocessing enlarges the 2D-keypoint box 1.2x


def crop_transform(center, scale: float, res: int = CROP_SIZE) -> np.ndarray:
    """(2,3) float64 affine matrix mapping source-image px to crop px.

    The box centre goes to crop px ``res / 2`` (the principal point of occbench.camera.project_to_crop,
    as in SPIN/PARE), the box's top-left corner to (0, 0).
    """
    cx, cy = float(center[0]), float(center[1])
    side = BOX_UNIT * float(scale)
    if not np.isfinite(side) or side <= 0:
        raise ValueError(f"crop scale must be positive and finite, got {scale!r}")
    s = res / side
    return np.array([[s, 0.0, res * (0.5 - cx / side)],
                     [0.0, s, res * (0.5 - cy / side)]], dtype=np.float64)


def transform_points(points, center, scale: float, res: int = CROP_SIZE) -> np.ndarray:
    """Image px -> crop px. points: (..., 2) or (..., >2) (extra columns such as confidence are kept)."""
    points = np.asarray(points, dtype=np.float64)
    m = crop_transform(center, scale, res)
    out = points.copy()
    out[..., :2] = points[..., :2] @ m[:, :2].T + m[:, 2]
    return out


def inverse_transform_points(points, center, scale: float, res: int = CROP_SIZE) -> np.ndarray:
    """Crop px -> image px (inverse of :func:`transform_points`)."""
    points = np.asarray(points, dtype=np.float64)
    side = BOX_UNIT * float(scale)
    out = points.copy()
    out[..., :2] = (points[..., :2] / res - 0.5) * side + np.asarray(center, dtype=np.float64)[:2]
    return out


def crop_image(image: np.ndarray, center, scale: float, res: int = CROP_SIZE, nearest: bool = False) -> np.ndarray:
    """Cut the SPIN crop out of ``image`` (H,W[,C]) -> (res,res[,C]) same dtype. One warpAffine.

    nearest: nearest-neighbour sampling and no area averaging (for label images)."""
    m = crop_transform(center, scale, res)
    zoom = m[0, 0]
    if nearest:
        return cv2.warpAffine(image, m, (res, res), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0)
    if zoom < 0.5:
        # Area-average first so strong down-scaling does not alias; then warp what is left.
        shrink = 2.0 * zoom
        h, w = image.shape[:2]
        new_w, new_h = max(1, int(round(w * shrink))), max(1, int(round(h * shrink)))
        sx, sy = new_w / w, new_h / h
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        # source px p maps to shrunk px q = (p + 0.5) * s - 0.5; compose m with the inverse of that map
        inv = np.array([[1.0 / sx, 0.0, 0.5 / sx - 0.5], [0.0, 1.0 / sy, 0.5 / sy - 0.5], [0, 0, 1.0]])
        m = m @ inv
    return cv2.warpAffine(image, m, (res, res), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def bbox_from_keypoints(keypoints, factor: float = DEFAULT_BBOX_FACTOR, conf_threshold: float = 0.0):
    """Square SPIN box around the confident 2D keypoints.

    keypoints: (J,2) or (J,3) image px (third column = confidence; a joint counts when conf > threshold).
    Returns (center (2,), scale) with box side = factor * max(width, height) of the keypoint box.
    Raises ValueError when no keypoint is usable.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    ok = np.isfinite(kp[:, :2]).all(axis=1)
    if kp.shape[1] > 2:
        ok &= kp[:, 2] > conf_threshold
    if not ok.any():
        raise ValueError("no confident 2D keypoint to build a box from")
    lo, hi = kp[ok, :2].min(axis=0), kp[ok, :2].max(axis=0)
    center = (lo + hi) / 2.0
    side = factor * float(max(hi - lo))
    if side <= 0:
        raise ValueError("2D keypoints span a zero-size box")
    return center, side / BOX_UNIT

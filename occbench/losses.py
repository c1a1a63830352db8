"""The default training loss of a zoo model: PARE Eq. 2.

:meth:`ZooModel.training_losses` calls it; BoPR and HKMR override that method with their papers' losses.

L_3D: MSE of the pelvis-aligned LSP-14 joints (m); L_2D: MSE of the projected LSP-14 joints in crop px / 112 - 1;
L_SMPL: MSE of the rotation matrices and of the betas; L_P: per-pixel cross-entropy of the 25 part maps at their
resolution, for models that return ``part_maps`` (PARE, 3DNBF's regressor) when part labels exist.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from occbench.camera import CROP_SIZE, project_to_crop

HALF = CROP_SIZE / 2.0
# PARE's loss weights (configs: keypoint 5, 3D keypoint 5, pose 1, beta 0.001, part segmentation 1)
DEFAULT_WEIGHTS = {"3d": 5.0, "2d": 5.0, "pose": 1.0, "betas": 0.001, "part": 1.0}


def pare_losses(body, rotmat, betas, cam, extras, batch, weights: dict, use_part_loss: bool,
                pelvis: str = "h36m-root") -> dict:
    """Scalar loss terms and 'total' of one batch (an :class:`occbench.train.Batch`). weights: overrides of
    DEFAULT_WEIGHTS; pelvis: the dataset's convention, applied to the predicted LSP-14 joints as it was to
    the GT."""
    w = {**DEFAULT_WEIGHTS, **weights}
    out = body(rotmat=rotmat, betas=betas)
    root = (out.joints_h36m[:, :1] if pelvis == "h36m-root" else out.joints_lsp[:, 2:4].mean(1, keepdim=True))
    pred3d = out.joints_lsp - root
    pred2d = project_to_crop(out.joints_lsp, cam) / HALF - 1.0
    gt2d = batch.joints2d / HALF - 1.0
    valid = batch.valid2d.float()[..., None]
    has = batch.has_smpl.float()
    terms = {
        "3d": w["3d"] * (pred3d - batch.joints3d).pow(2).sum(-1).mean(),
        "2d": w["2d"] * ((pred2d - gt2d).pow(2) * valid).sum(-1).mean(),
        "pose": w["pose"] * ((rotmat - batch.rotmat).pow(2).sum((-1, -2)).mean(-1) * has).mean(),
        "betas": w["betas"] * ((betas - batch.betas).pow(2).mean(-1) * has).mean(),
    }
    if "part_maps" in extras and batch.parts is not None and use_part_loss:
        logits = extras["part_maps"]
        terms["part"] = w["part"] * F.cross_entropy(logits, resize_labels(batch.parts, logits.shape[-1]))
    terms["total"] = sum(terms.values())
    return terms


def resize_labels(parts: torch.Tensor, size: int) -> torch.Tensor:
    """(B,S,S) int64 labels -> (B,size,size) by nearest sampling of cell centres."""
    if parts.shape[-1] == size:
        return parts
    return F.interpolate(parts[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()

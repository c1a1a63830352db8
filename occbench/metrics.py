"""Pose and shape error metrics (REFERENCE.md 3), batched in torch.

Conventions shared by every function here:

- Inputs are batched tensors in **metres**: joints (B,J,3), vertices (B,V,3), 2D joints (B,J,2) in crop
  pixels. Any float dtype (float32/float64) and any device; outputs keep the input's dtype and device.
- Outputs are **per-joint** (or per-vertex) errors in **millimetres**, shape (B,J) (or (B,V)); nothing is
  averaged away, because heatmaps and per-joint tables need the full arrays. Use :func:`reduce` to get one
  number, with an explicit reduction rule.
- ``mask``: optional (B,J) bool, True where the ground-truth joint is valid ("visible"). Errors at masked-out
  joints are **NaN** in the output, so that a masked joint can never leak into a mean unnoticed; pass the
  same mask to :func:`reduce`. Values stored at masked-out joints (garbage, NaN, inf) never influence any
  other entry of the result.
- Pelvis alignment is the caller's explicit choice, made with :func:`align_pelvis` before calling
  :func:`mpjpe` / :func:`axis_mje`; :func:`pa_mpjpe` does its own similarity alignment; :func:`pve` is
  computed without any alignment (PARE).

Known peer bugs that are deliberately not reproduced: VIBE's batched Procrustes decides whether to transpose
from ``shape[0]`` (wrong for batch sizes 2 and 3); 3DNBF's PCKh pools correct counts over all joints of all
images before dividing instead of averaging per-joint accuracies.
"""
from __future__ import annotations

import torch

from occbench.data.joints import LSP14_HEAD_TOP, LSP14_LEFT_HIP, LSP14_NECK, LSP14_RIGHT_HIP

MM_PER_M = 1000.0


PELVIS_CONVENTIONS = ("h36m-root", "mid-hip")
MIN_PA_JOINTS = 3   # a similarity transform needs 3 points: rows with fewer evaluated joints have no PA-MPJPE
REDUCTIONS = ("per-sample", "pooled-visible")


# --------------------------------------------------------------------------------------------- helpers

def _check_points(name: str, x: torch.Tensor, dim: int | None = 3) -> None:
    if not torch.is_tensor(x) or x.ndim != 3 or (dim is not None and x.shape[-1] != dim):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor (B,N,{dim if dim else 'D'}), got {shape}")


def _check_pair(pred: torch.Tensor, gt: torch.Tensor, dim: int | None = 3) -> None:
    _check_points("pred", pred, dim)
    _check_points("gt", gt, dim)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must have the same shape")


def _as_mask(mask, batch: int, joints: int, device) -> torch.Tensor | None:
    """(B,J) bool on ``device`` or None; accepts 0/1 numbers too."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != (batch, joints):
        raise ValueError(f"mask: expected shape ({batch}, {joints}), got {tuple(mask.shape)}")
    return mask.bool()


def _blank_masked(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """NaN at masked-out entries; values is (B,J) or (B,J,C), mask (B,J)."""
    if mask is None:
        return values
    keep = mask if values.ndim == 2 else mask[..., None]
    return torch.where(keep, values, torch.full_like(values, float("nan")))


def _zero_masked(points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked-out points replaced by 0 (torch.where, so NaN/inf garbage there cannot propagate)."""
    return torch.where(mask[..., None], points, torch.zeros_like(points))


# --------------------------------------------------------------------------------------- alignment

def align_pelvis(joints: torch.Tensor, convention: str = "h36m-root",
                 pelvis: torch.Tensor | None = None) -> torch.Tensor:
    """Subtract the pelvis from every joint (the MPJPE alignment of REFERENCE.md 2).

    joints: (B,J,3). For ``mid-hip`` they must be LSP-14 ordered (J=14): pelvis = mean of joints 2 and 3
    (right and left hip), as VIBE and mmhuman3d do. For ``h36m-root`` (SPIN, PARE; occbench's default) the
    pelvis is H36M joint 0 of the same skeleton, passed as ``pelvis`` (B,3) (or (B,1,3)), e.g.
    ``joints_h36m[:, 0]``. Apply the same convention to prediction and ground truth.
    Returns (B,J,3), same dtype/device.
    """
    _check_points("joints", joints)
    if convention == "mid-hip":
        if joints.shape[1] != 14:
            raise ValueError(f"mid-hip pelvis needs LSP-14 joints (B,14,3), got {tuple(joints.shape)}")
        root = joints[:, [LSP14_RIGHT_HIP, LSP14_LEFT_HIP]].mean(dim=1, keepdim=True)
    elif convention == "h36m-root":
        if pelvis is None:
            raise ValueError("h36m-root pelvis convention: pass pelvis=joints_h36m[:, 0] (B,3)")
        root = pelvis.reshape(joints.shape[0], 1, 3).to(joints)
    else:
        raise ValueError(f"unknown pelvis convention {convention!r}; valid: {', '.join(PELVIS_CONVENTIONS)}")
    return joints - root


def similarity_transform(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None):
    """Least-squares similarity transform (scale, rotation, translation) taking ``pred`` onto ``gt``.

    pred, gt: (B,J,3); mask: (B,J) bool, the fit uses visible joints only (weights 0/1).
    Per sample: centre both sets, K = X_pred^T X_gt (3,3) = U S V^T, R = V Z U^T with
    Z = diag(1, 1, sign(det(U V^T))) (no reflections), scale = trace(R K) / ||X_pred||^2,
    t = mu_gt - scale * R mu_pred. Computed in float64 for stability; returned in the input dtype.
    Returns scale (B,), R (B,3,3), t (B,3). Samples with fewer than 3 visible joints have no defined
    similarity fit: their scale, R and t are NaN.
    """
    _check_pair(pred, gt)
    batch, joints, _ = pred.shape
    mask = _as_mask(mask, batch, joints, pred.device)
    x, y = pred.double(), gt.double()
    if mask is None:
        weight = torch.ones(batch, joints, dtype=torch.float64, device=pred.device)
    else:
        x, y = _zero_masked(x, mask), _zero_masked(y, mask)
        weight = mask.double()
    count = weight.sum(dim=1)                                            # (B,)
    safe_count = count.clamp(min=1.0)[:, None, None]
    mu_x = (weight[..., None] * x).sum(dim=1, keepdim=True) / safe_count   # (B,1,3)
    mu_y = (weight[..., None] * y).sum(dim=1, keepdim=True) / safe_count
    xc = (x - mu_x) * weight[..., None]
    yc = (y - mu_y) * weight[..., None]
    var_x = (xc ** 2).sum(dim=(1, 2))                                      # (B,)
    k = xc.transpose(1, 2) @ yc                                            # (B,3,3), always (3,3) per sample
    u, _, vh = torch.linalg.svd(k)
    v = vh.transpose(1, 2)
    z = torch.eye(3, dtype=torch.float64, device=pred.device).repeat(batch, 1, 1)
    z[:, -1, -1] = torch.sign(torch.linalg.det(u @ vh))
    rot = v @ z @ u.transpose(1, 2)
    scale = torch.einsum("bii->b", rot @ k) / var_x.clamp(min=torch.finfo(torch.float64).tiny)
    trans = mu_y[:, 0] - scale[:, None] * (rot @ mu_x[:, 0, :, None])[..., 0]
    degenerate = (count < 3) | (var_x <= 0)
    if degenerate.any():
        nan = float("nan")
        scale = scale.masked_fill(degenerate, nan)
        rot = rot.masked_fill(degenerate[:, None, None], nan)
        trans = trans.masked_fill(degenerate[:, None], nan)
    dtype = pred.dtype
    return scale.to(dtype), rot.to(dtype), trans.to(dtype)


def procrustes_align(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``pred`` (B,J,3) after the similarity transform of :func:`similarity_transform` (fitted on visible
    joints only); every joint is transformed, masked ones included. Returns (B,J,3)."""
    scale, rot, trans = similarity_transform(pred, gt, mask)
    return scale[:, None, None] * (pred @ rot.transpose(1, 2)) + trans[:, None, :]


# ------------------------------------------------------------------------------------- 3D metrics

def mpjpe(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-joint position error in mm, (B,J): ||pred - gt|| * 1000, NaN where ``mask`` is False.

    pred, gt: (B,J,3) metres, both already pelvis-aligned with :func:`align_pelvis`.
    """
    _check_pair(pred, gt)
    mask = _as_mask(mask, pred.shape[0], pred.shape[1], pred.device)
    return _blank_masked(torch.linalg.vector_norm(pred - gt, dim=-1) * MM_PER_M, mask)


def pa_mpjpe(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-joint error after per-sample similarity Procrustes alignment, mm, (B,J).

    pred, gt: (B,J,3) metres (pelvis alignment does not matter: the fit includes a translation).
    With ``mask`` the transform is fitted on visible joints only and masked-out joints are NaN.
    Samples with fewer than 3 visible joints cannot be aligned: all their entries are NaN.
    """
    aligned = procrustes_align(pred, gt, mask)
    return mpjpe(aligned, gt, mask)


def axis_mje(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-axis absolute joint error in mm, (B,J,3): |pred - gt| per x, y, z (BoPR Table 3).

    pred, gt: (B,J,3) metres, pelvis-aligned. NaN where ``mask`` is False. ``reduce`` accepts (B,J,3)
    and returns one value per axis.
    """
    _check_pair(pred, gt)
    mask = _as_mask(mask, pred.shape[0], pred.shape[1], pred.device)
    return _blank_masked((pred - gt).abs() * MM_PER_M, mask)


def pve(pred_vertices: torch.Tensor, gt_vertices: torch.Tensor) -> torch.Tensor:
    """Per-vertex error in mm, (B,V), without any alignment (PARE's PVE / V2V).

    pred_vertices, gt_vertices: (B,V,3) metres (V = 6890 for SMPL), both in the body frame without
    translation, as the body model returns them.
    """
    _check_pair(pred_vertices, gt_vertices)
    return torch.linalg.vector_norm(pred_vertices - gt_vertices, dim=-1) * MM_PER_M


def pve_s(pred_rest_vertices: torch.Tensor, gt_rest_vertices: torch.Tensor) -> torch.Tensor:
    """PVE-S (DaNet Sec. 5.2), (B,V) mm: PVE between meshes posed with **all pose parameters zero**
    (global orientation included), i.e. each model's own betas in the rest pose. The caller builds the
    meshes, e.g. with :func:`decomposed_vertices`."""
    return pve(pred_rest_vertices, gt_rest_vertices)


def pve_p(pred_zero_shape_vertices: torch.Tensor, gt_zero_shape_vertices: torch.Tensor) -> torch.Tensor:
    """PVE-P (DaNet Sec. 5.2), (B,V) mm: PVE between meshes with **zero betas** and each model's own pose.
    The caller builds the meshes, e.g. with :func:`decomposed_vertices`."""
    return pve(pred_zero_shape_vertices, gt_zero_shape_vertices)


def decomposed_vertices(body_model, rotmat: torch.Tensor, betas: torch.Tensor):
    """The two meshes PVE-S / PVE-P need, from a body model ``body_model(rotmat=, betas=)`` (occbench.body).

    rotmat: (B,24,3,3), betas: (B,10). Returns (rest_pose_vertices, zero_shape_vertices), each (B,V,3):
    identity rotations with ``betas``, and ``rotmat`` with zero betas. Use the gendered body for 3DPW GT.
    """
    identity = torch.eye(3, dtype=rotmat.dtype, device=rotmat.device).expand_as(rotmat).contiguous()
    rest = body_model(rotmat=identity, betas=betas).vertices
    zero_shape = body_model(rotmat=rotmat, betas=torch.zeros_like(betas)).vertices
    return rest, zero_shape


# ------------------------------------------------------------------------------------------- PCKh

def head_size_lsp14(gt2d: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PCKh head size (B,): ||GT neck (LSP 12) - GT head top (LSP 13)|| in the units of ``gt2d`` (B,14,2).

    NaN for samples whose neck or head top is masked out (no head size, so the sample cannot be scored).
    """
    _check_points("gt2d", gt2d, dim=None)
    if gt2d.shape[1] != 14:
        raise ValueError(f"head_size_lsp14 needs LSP-14 joints (B,14,D), got {tuple(gt2d.shape)}")
    size = torch.linalg.vector_norm(gt2d[:, LSP14_NECK] - gt2d[:, LSP14_HEAD_TOP], dim=-1)
    mask = _as_mask(mask, gt2d.shape[0], 14, gt2d.device)
    if mask is not None:
        has_head = mask[:, LSP14_NECK] & mask[:, LSP14_HEAD_TOP]
        size = torch.where(has_head, size, torch.full_like(size, float("nan")))
    return size


def pckh(pred2d: torch.Tensor, gt2d: torch.Tensor, head_size: torch.Tensor,
         mask: torch.Tensor | None = None, threshold: float = 0.5) -> torch.Tensor:
    """Per-joint PCKh correctness, (B,J) bool: ||pred2d - gt2d|| < threshold * head_size.

    pred2d, gt2d: (B,J,2) crop pixels (predicted 2D = weak-perspective projection of the predicted 3D
    joints); head_size: (B,) from :func:`head_size_lsp14`. Entries where ``mask`` is False, and every joint
    of a sample whose head size is not a positive finite number, are False: a bool cannot say "not scored",
    so always pass the same mask (and head_size) to :func:`pckh_accuracy`, which leaves them out.
    """
    _check_pair(pred2d, gt2d, dim=2)
    batch, joints, _ = pred2d.shape
    head_size = torch.as_tensor(head_size, dtype=pred2d.dtype, device=pred2d.device).reshape(batch)
    mask = _as_mask(mask, batch, joints, pred2d.device)
    distance = torch.linalg.vector_norm(pred2d - gt2d, dim=-1)
    correct = distance < threshold * head_size[:, None]
    scorable = _scorable(mask, head_size, batch, joints)
    return correct & scorable


def _scorable(mask, head_size, batch, joints) -> torch.Tensor:
    valid_head = torch.isfinite(head_size) & (head_size > 0)
    scorable = valid_head[:, None].expand(batch, joints)
    return scorable if mask is None else scorable & mask


def pckh_accuracy(correct: torch.Tensor, mask: torch.Tensor | None = None,
                  head_size: torch.Tensor | None = None):
    """PCKh accuracy (REFERENCE.md 3): per joint over its visible instances, then the mean over joints.

    correct: (B,J) bool from :func:`pckh`; mask: the (B,J) visibility mask given to :func:`pckh`;
    head_size: (B,) the head sizes given to :func:`pckh` (samples without a valid one are left out).
    Returns (mean, per_joint): a 0-dim tensor and (J,) float64 fractions in [0,1]. A joint with no
    visible instance has per-joint accuracy NaN and is left out of the mean.
    (3DNBF instead divides the correct count pooled over all joints and images by the pooled visible
    count, which weights joints by how often they are visible; occbench does not.)
    """
    if correct.ndim != 2:
        raise ValueError(f"correct: expected (B,J) bool, got {tuple(correct.shape)}")
    batch, joints = correct.shape
    mask = _as_mask(mask, batch, joints, correct.device)
    if head_size is not None:
        head_size = torch.as_tensor(head_size, device=correct.device).reshape(batch).double()
        mask = _scorable(mask, head_size, batch, joints)
    _, hits, totals = pckh_counts(correct.bool().cpu(), None if mask is None else mask.cpu())
    mean, per_joint = pckh_from_counts(hits.sum(dim=0), totals.sum(dim=0))
    return mean.to(correct.device), per_joint.to(correct.device)


# -------------------------------------------------------------------------------------- reduction
#
# One implementation of every reduction: the engine's metrics.json (summed chunk by chunk), the results'
# bootstrap confidence intervals and :func:`reduce` all go through :func:`sample_terms`, which turns rows of
# per-joint errors into one (numerator, denominator) pair per sample; an estimate is sum(num) / sum(den).
# Rows are (sample, window) pairs: a clean copy, an occluded window, a worst window.

def pa_mask(mask: torch.Tensor) -> torch.Tensor:
    """The joints PA-MPJPE is evaluated on: ``mask`` (B,J) where the row has at least MIN_PA_JOINTS of them.

    A similarity transform (7 degrees of freedom) is not determined by fewer than 3 points, so a row (a
    window that hides all but 1-2 joints) has no PA-MPJPE: it is left out of PA-MPJPE reductions (and
    counted), while its MPJPE still counts. Fitting on hidden joints instead would use what the protocol
    says is not evaluated.
    """
    mask = torch.as_tensor(mask).bool()
    return mask & (mask.sum(dim=1, keepdim=True) >= MIN_PA_JOINTS)


def row_means(errors, mask=None) -> torch.Tensor:
    """(R,) float64 mean over each row's evaluated joints (NaN for a row with none).

    errors: (R,J) (or (R,J,C): then (R,C)); mask: (R,J) bool. A NaN at an evaluated joint makes the row's
    mean NaN (see :func:`reduce`)."""
    errors = torch.as_tensor(errors).double()
    rows, joints = errors.shape[:2]
    mask = torch.ones(rows, joints, dtype=torch.bool) if mask is None else \
        _as_mask(mask, rows, joints, errors.device)
    weight = mask.double() if errors.ndim == 2 else mask.double()[..., None]
    total = torch.where(weight > 0, errors, torch.zeros_like(errors)).sum(dim=1)
    return total / weight.sum(dim=1)


def sample_terms(errors, mask=None, sample=None, reduction: str = "per-sample"):
    """Per-sample (numerator, denominator) of a reduction over rows of per-joint errors.

    errors: (R,J) or (R,J,C) mm, one row per (sample, window); mask: (R,J) bool, the evaluated joints;
    sample: (R,) int sample of each row (default: every row its own sample).
    Returns (samples (S,) sorted ids, num (S,[C]) float64, den (S,) float64); the estimate is
    ``num.sum(0) / den.sum()``. Samples without an evaluated joint are left out.

    - ``per-sample`` (PARE): mean over each row's evaluated joints, then over the sample's rows (num), den 1.
    - ``pooled-visible`` (3DNBF AdvOcc): the sum of the sample's evaluated errors (num) and their count (den),
      so samples with more evaluated joints weigh more.
    """
    errors = torch.as_tensor(errors).double()
    if errors.ndim not in (2, 3):
        raise ValueError(f"errors: expected (R,J) or (R,J,C), got {tuple(errors.shape)}")
    rows, joints = errors.shape[:2]
    mask = torch.ones(rows, joints, dtype=torch.bool) if mask is None else \
        _as_mask(mask, rows, joints, errors.device)
    sample = torch.arange(rows) if sample is None else torch.as_tensor(sample).long().reshape(rows)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    keep = mask.any(dim=1)
    errors, mask, sample = errors[keep], mask[keep], sample[keep]
    samples, inverse = torch.unique(sample, return_inverse=True)
    extra = errors.shape[2:]
    num = torch.zeros((len(samples), *extra), dtype=torch.float64)
    if reduction == "per-sample":
        per_row = row_means(errors, mask)
        num.index_add_(0, inverse, per_row)
        counts = torch.zeros(len(samples), dtype=torch.float64).index_add_(
            0, inverse, torch.ones(len(inverse), dtype=torch.float64))
        num = num / (counts if num.ndim == 1 else counts[:, None])
        return samples, num, torch.ones(len(samples), dtype=torch.float64)
    weight = mask.double() if errors.ndim == 2 else mask.double()[..., None]
    num.index_add_(0, inverse, torch.where(weight > 0, errors, torch.zeros_like(errors)).sum(dim=1))
    den = torch.zeros(len(samples), dtype=torch.float64).index_add_(0, inverse, mask.double().sum(dim=1))
    return samples, num, den


def reduce(errors: torch.Tensor, mask: torch.Tensor | None = None,
           reduction: str = "per-sample", sample=None) -> torch.Tensor:
    """One number from per-joint errors (REFERENCE.md 3: the reduction is a recorded parameter).

    errors: (B,J) (or (B,J,C), e.g. :func:`axis_mje`, giving one value per channel); mask: (B,J) bool,
    the same mask the errors were computed with (None: every entry counts); sample: (B,) the sample of each
    row when a sample has several rows (windows; default: each row is a sample). See :func:`sample_terms`.

    - ``per-sample`` (PARE): mean over the visible joints of each row, then over each sample's rows, then
      over the samples that have at least one visible joint.
    - ``pooled-visible`` (3DNBF AdvOcc): mean over all visible (row, joint) pairs, so samples with
      more visible joints weigh more.

    Masked-out entries are ignored whatever they hold. A NaN at a *visible* entry (a model that produced
    NaN) is kept and makes the result NaN, on purpose: silently dropping it would reward a broken
    prediction. PA-MPJPE rows that cannot be aligned are excluded by their mask (:func:`pa_mask`), not by
    their NaN. Returns a 0-dim tensor (or (C,)) in the errors' dtype and device.
    """
    if errors.ndim not in (2, 3):
        raise ValueError(f"errors: expected (B,J) or (B,J,C), got {tuple(errors.shape)}")
    _, num, den = sample_terms(errors.detach().cpu(), None if mask is None else torch.as_tensor(mask).cpu(),
                               None if sample is None else torch.as_tensor(sample).cpu(), reduction)
    value = num.sum(dim=0) / den.sum()
    return value.to(dtype=errors.dtype, device=errors.device)


def pckh_counts(correct, mask=None, sample=None):
    """Per-sample, per-joint PCKh counts: (samples (S,), correct (S,J), scored (S,J)) float64.

    correct: (R,J) bool (or 1/0 floats); mask: (R,J) the scored instances (NaN in ``correct`` also means not
    scored); sample: (R,) int (default: each row its own sample)."""
    correct = torch.as_tensor(correct)
    rows, joints = correct.shape
    scored = torch.ones(rows, joints, dtype=torch.bool) if mask is None else \
        _as_mask(mask, rows, joints, correct.device)
    values = correct.double()
    scored = scored & torch.isfinite(values)
    sample = torch.arange(rows) if sample is None else torch.as_tensor(sample).long().reshape(rows)
    samples, inverse = torch.unique(sample, return_inverse=True)
    hits = torch.zeros(len(samples), joints, dtype=torch.float64).index_add_(
        0, inverse, torch.where(scored, values, torch.zeros_like(values)))
    totals = torch.zeros(len(samples), joints, dtype=torch.float64).index_add_(0, inverse, scored.double())
    return samples, hits, totals


def pckh_from_counts(hits, totals):
    """(mean, per_joint) PCKh fractions from summed counts (J,): per joint over its scored instances, then
    the mean over joints that have any (3DNBF instead pools all joints; occbench does not)."""
    hits, totals = torch.as_tensor(hits).double(), torch.as_tensor(totals).double()
    per_joint = hits / totals                                              # NaN where 0/0
    return torch.nanmean(per_joint), per_joint

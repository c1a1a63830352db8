"""Rotation conversions, batched torch, any leading batch shape flattened to B.

The 6D representation follows SPIN / PARE exactly: a 6-vector ``x`` is read as ``x.view(-1, 3, 2)``, its two
columns ``a1 = x[:, :, 0]`` and ``a2 = x[:, :, 1]`` are orthonormalised by Gram-Schmidt and the third column is
their cross product. So ``x = R[:, :2].reshape(6)`` = (R00, R01, R10, R11, R20, R21): the first two COLUMNS of
the rotation matrix, stored row-major. Checkpoints of PARE / SPIN / DaNet / 3DNBF rely on this layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rot6d_to_rotmat(x: torch.Tensor) -> torch.Tensor:
    """(..., 6) or (B, 6k) -> (N, 3, 3) rotation matrices, N = x.numel() // 6 (SPIN's ``view(-1, 3, 2)``)."""
    x = x.reshape(-1, 3, 2)
    a1, a2 = x[:, :, 0], x[:, :, 1]
    b1 = F.normalize(a1, dim=1)
    b2 = F.normalize(a2 - (b1 * a2).sum(dim=1, keepdim=True) * b1, dim=1)
    b3 = torch.cross(b1, b2, dim=1)
    return torch.stack((b1, b2, b3), dim=-1)


def rotmat_to_rot6d(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (N, 6): the first two columns, in the layout ``rot6d_to_rotmat`` reads."""
    return rotmat.reshape(-1, 3, 3)[:, :, :2].reshape(-1, 6)


def axis_angle_to_rotmat(axis_angle: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis * angle (radians) -> (N, 3, 3) by Rodrigues' formula; exact and smooth at angle 0."""
    aa = axis_angle.reshape(-1, 3)
    angle_sq = (aa * aa).sum(dim=1, keepdim=True)  # (N, 1)
    angle = torch.sqrt(angle_sq.clamp_min(1e-24))
    small = angle_sq < 1e-8
    # sin(t)/t and (1 - cos t)/t^2 with Taylor series near 0 so gradients stay finite.
    sinc = torch.where(small, 1.0 - angle_sq / 6.0, torch.sin(angle) / angle)
    cosc = torch.where(small, 0.5 - angle_sq / 24.0, (1.0 - torch.cos(angle)) / angle_sq.clamp_min(1e-24))
    x, y, z = aa[:, 0], aa[:, 1], aa[:, 2]
    zero = torch.zeros_like(x)
    skew = torch.stack((zero, -z, y, z, zero, -x, -y, x, zero), dim=1).reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand(aa.shape[0], 3, 3)
    return eye + sinc[:, :, None] * skew + cosc[:, :, None] * (skew @ skew)


def rotmat_to_quaternion(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (N, 4) unit quaternions (w, x, y, z) with w >= 0, numerically stable for all angles."""
    m = rotmat.reshape(-1, 3, 3)
    m00, m11, m22 = m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]
    # Four candidate |components|; take the largest to divide by (Shepperd's method).
    q_abs = torch.sqrt(torch.stack((1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                                    1 - m00 + m11 - m22, 1 - m00 - m11 + m22), dim=1).clamp_min(1e-12))
    candidates = torch.stack((
        torch.stack((q_abs[:, 0] ** 2, m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]), 1),
        torch.stack((m[:, 2, 1] - m[:, 1, 2], q_abs[:, 1] ** 2, m[:, 1, 0] + m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0]), 1),
        torch.stack((m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] + m[:, 0, 1], q_abs[:, 2] ** 2, m[:, 2, 1] + m[:, 1, 2]), 1),
        torch.stack((m[:, 1, 0] - m[:, 0, 1], m[:, 2, 0] + m[:, 0, 2], m[:, 2, 1] + m[:, 1, 2], q_abs[:, 3] ** 2), 1),
    ), dim=1) / (2.0 * q_abs[:, :, None])
    best = q_abs.argmax(dim=1)
    quat = candidates[torch.arange(m.shape[0], device=m.device), best]
    quat = F.normalize(quat, dim=1)
    return torch.where(quat[:, :1] < 0, -quat, quat)


def rotmat_to_axis_angle(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (N, 3) axis * angle with angle in [0, pi]."""
    quat = rotmat_to_quaternion(rotmat)
    w, xyz = quat[:, :1], quat[:, 1:]
    sin_half = xyz.norm(dim=1, keepdim=True)
    angle = 2.0 * torch.atan2(sin_half, w)
    # angle / sin(angle/2) -> 2 as the angle -> 0
    scale = torch.where(sin_half < 1e-6, 2.0 / w.clamp_min(1e-12), angle / sin_half.clamp_min(1e-12))
    return xyz * scale

"""Pure-PyTorch volume renderer of isotropic Gaussian kernels (3DNBF's Neural Body Volumes).

3DNBF renders its kernels with VoGE, a CUDA extension. This module renders the same kind of volume with
plain tensor operations, so it runs (and differentiates) on CPU and CUDA alike.

The volume. Kernel ``k`` has centre ``M_k`` (camera frame: x right, y down, z forward, metres), standard
deviation ``sigma_k`` and density ``rho_k(X) = rho0_k exp(-|X - M_k|^2 / (2 sigma_k^2))`` with
``rho0_k = tau / (sqrt(2 pi) sigma_k)``, so that a ray through the centre has optical depth ``tau``.
The feature seen through pixel ``p`` is the volume-rendering integral (3DNBF paper Eq. 4)::

    phi(p) = int_0^inf T(t) sum_k rho_k(r_p(t)) phi_k dt,     T(t) = exp(-int_0^t sum_k rho_k(r_p(s)) ds)

Analytic form used here. Along a ray with unit direction ``d`` kernel ``k`` is a 1-D Gaussian in ``t``
centred at ``t_k = d . M_k`` with width ``sigma_k`` and total optical depth
``c_k = tau exp(-D_k^2 / (2 sigma_k^2))``, ``D_k`` = distance of ``M_k`` from the ray. Then

* one kernel alone: ``alpha_k = 1 - exp(-c_k)`` (exact);
* the ray's total opacity ``sum_k alpha_k = 1 - exp(-sum_k c_k)`` (exact, whatever the kernels do);
* the split of that opacity between kernels attenuates kernel ``k`` by the optical depth of the others in
  front of it, averaged over ``k``'s own extent:
  ``alpha~_k = (1 - exp(-c_k)) exp(-sum_{j != k} c_j Phi((t_k - t_j) / sqrt(sigma_k^2 + sigma_j^2)))``
  (``Phi`` the normal CDF), rescaled so that the total opacity is the exact one above.
  This is exact when kernels overlapping on a ray are separated in depth by a few sigma (the usual case on a
  body surface seen from outside) and close otherwise; tests/test_nbf_render.py measures it against a
  brute-force quadrature of the integral above.

Rendered feature ``F(p) = sum_k alpha_k(p) phi_k``; opacity ``O(p) = sum_k alpha_k(p)``.
Like VoGE's ``max_assign``, only the ``max_kernels_per_pixel`` kernels with the largest ``c_k`` on each ray
are kept (chosen without gradient, then evaluated with gradient); dropped kernels have negligible ``c_k``.
Kernels behind the camera (``z <= 0``) are ignored; the integral assumes kernels are many sigma in front of
the camera (true at the 5000 px focal length of SPIN/PARE/3DNBF, where the body is ~50 m away).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_OPTICAL_DEPTH = 4.0  # a ray through a kernel's centre is 98% opaque


@dataclass
class PinholeCamera:
    """Pinhole camera of a feature map: pixel ``(u, v)`` centre sits at ``(u + 0.5, v + 0.5)``.

    focal: px of this map; principal: (cx, cy) px; size: (H, W).
    """

    focal: float
    principal: tuple
    size: tuple

    @classmethod
    def for_crop(cls, map_size: int, focal_length: float = 5000.0, crop_size: int = 224) -> "PinholeCamera":
        """The camera of an ``map_size`` x ``map_size`` map covering the ``crop_size`` crop (SPIN convention)."""
        scale = map_size / crop_size
        return cls(focal=focal_length * scale, principal=(map_size / 2.0, map_size / 2.0),
                   size=(map_size, map_size))

    def ray_directions(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Unit ray directions through the pixel centres: (H*W, 3), row-major."""
        height, width = self.size
        v, u = torch.meshgrid(torch.arange(height, device=device, dtype=dtype) + 0.5,
                              torch.arange(width, device=device, dtype=dtype) + 0.5, indexing="ij")
        x = (u - self.principal[0]) / self.focal
        y = (v - self.principal[1]) / self.focal
        d = torch.stack([x, y, torch.ones_like(x)], dim=-1).reshape(-1, 3)
        return d / d.norm(dim=-1, keepdim=True)

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """(..., 3) camera-frame points -> (..., 2) pixel coordinates of this map."""
        z = points[..., 2:3].clamp_min(1e-6)
        xy = self.focal * points[..., :2] / z
        return xy + points.new_tensor(self.principal)


@dataclass
class RenderOutput:
    """features: (B,C,H,W) rendered ``F``; opacity: (B,H,W) ``O``;
    kernel_index: (B,H*W,M) kernels kept per pixel; weights: (B,H*W,M) their ``alpha``."""

    features: torch.Tensor
    opacity: torch.Tensor
    kernel_index: torch.Tensor
    weights: torch.Tensor


def _cross_norm2(centers: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """|M x d|^2 = squared distance of centre from the ray, computed without the cancellation of
    |M|^2 - (d.M)^2 (which loses all precision at 50 m in float32).

    centers: (B,K,3) or (B,P,M,3) broadcastable with dirs: (P,3) or (1,P,1,3). Returns the broadcast shape.
    """
    mx, my, mz = centers.unbind(-1)
    dx, dy, dz = dirs.unbind(-1)
    cx = my * dz - mz * dy
    cy = mz * dx - mx * dz
    cz = mx * dy - my * dx
    return cx * cx + cy * cy + cz * cz


@torch.no_grad()
def select_kernels(centers: torch.Tensor, sigma: torch.Tensor, dirs: torch.Tensor, count: int,
                   chunk: int = 4096) -> torch.Tensor:
    """Indices (B,P,count) of the kernels with the largest optical depth on each ray (no gradient).

    centers: (B,K,3); sigma: (K,) or (B,K); dirs: (P,3).
    """
    batch, num_kernels, _ = centers.shape
    count = min(count, num_kernels)
    sigma = sigma.expand(batch, num_kernels)
    behind = centers[..., 2] <= 0
    out = []
    for start in range(0, dirs.shape[0], chunk):
        d = dirs[start:start + chunk]
        mx, my, mz = (c[:, None, :] for c in centers.unbind(-1))          # (B,1,K)
        dx, dy, dz = (c[None, :, None] for c in d.unbind(-1))              # (1,P,1)
        dist2 = (my * dz - mz * dy) ** 2 + (mz * dx - mx * dz) ** 2 + (mx * dy - my * dx) ** 2
        score = dist2 / (sigma[:, None, :] ** 2)
        score = score.masked_fill(behind[:, None, :], float("inf"))
        out.append(score.topk(count, dim=-1, largest=False).indices)
    return torch.cat(out, dim=1)


def render_gaussians(centers: torch.Tensor, sigma, features: torch.Tensor, camera: PinholeCamera,
                     optical_depth: float = DEFAULT_OPTICAL_DEPTH, max_kernels_per_pixel: int = 16,
                     kernel_index: torch.Tensor | None = None) -> RenderOutput:
    """Render kernel features to a feature map (differentiable in centres, sigma and features).

    centers: (B,K,3) camera frame; sigma: float, (K,) or (B,K) metres; features: (B,K,C) or (K,C);
    kernel_index: optional precomputed (B,H*W,M) selection (else :func:`select_kernels`).
    """
    batch, num_kernels, _ = centers.shape
    height, width = camera.size
    dirs = camera.ray_directions(centers.device, centers.dtype)                       # (P,3)
    sigma = torch.as_tensor(sigma, dtype=centers.dtype, device=centers.device)
    sigma = sigma.expand(batch, num_kernels) if sigma.dim() < 2 else sigma
    if features.dim() == 2:
        features = features.expand(batch, *features.shape)
    if kernel_index is None:
        kernel_index = select_kernels(centers.detach(), sigma.detach(), dirs, max_kernels_per_pixel)
    num_pixels, per_pixel = kernel_index.shape[1:]

    flat = kernel_index.reshape(batch, -1)
    m = torch.gather(centers, 1, flat[..., None].expand(-1, -1, 3)).view(batch, num_pixels, per_pixel, 3)
    s = torch.gather(sigma, 1, flat).view(batch, num_pixels, per_pixel)
    d = dirs.view(1, num_pixels, 1, 3)
    dist2 = _cross_norm2(m, d)                                                          # (B,P,M)
    depth = (m * d).sum(-1)                                                             # t_k
    c = optical_depth * torch.exp(-0.5 * dist2 / (s * s))
    c = c * (m[..., 2] > 0).to(c.dtype)                                                # behind the camera

    # Optical depth of kernel j in front of kernel k, averaged over k's extent along the ray.
    spread = torch.sqrt(s[..., :, None] ** 2 + s[..., None, :] ** 2)
    front = 0.5 * (1.0 + torch.erf((depth[..., :, None] - depth[..., None, :]) / (spread * math.sqrt(2.0))))
    eye = torch.eye(per_pixel, dtype=c.dtype, device=c.device)
    attenuation = ((front * (1.0 - eye)) * c[..., None, :]).sum(-1)                     # (B,P,M)
    alpha = -torch.expm1(-c) * torch.exp(-attenuation)
    total = -torch.expm1(-c.sum(-1, keepdim=True))
    alpha = alpha * total / alpha.sum(-1, keepdim=True).clamp_min(1e-12)

    feat = torch.gather(features, 1, flat[..., None].expand(-1, -1, features.shape[-1]))
    feat = feat.view(batch, num_pixels, per_pixel, -1)
    rendered = (alpha[..., None] * feat).sum(2)                                         # (B,P,C)
    rendered = rendered.transpose(1, 2).reshape(batch, -1, height, width)
    opacity = alpha.sum(-1).view(batch, height, width)
    return RenderOutput(features=rendered, opacity=opacity, kernel_index=kernel_index, weights=alpha)


def render_gaussians_quadrature(centers: torch.Tensor, sigma, features: torch.Tensor, camera: PinholeCamera,
                                optical_depth: float = DEFAULT_OPTICAL_DEPTH, samples: int = 20000,
                                margin: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the volume-rendering integral by brute-force quadrature along every ray (slow; tests only).

    Same arguments as :func:`render_gaussians` (no kernel selection). Returns (features (B,C,H,W),
    opacity (B,H,W)) in float64. The ray is sampled on ``[min t_k - margin sigma, max t_k + margin sigma]``.
    """
    centers = centers.double()
    batch, num_kernels, _ = centers.shape
    height, width = camera.size
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=centers.device).expand(batch, num_kernels)
    features = features.double()
    if features.dim() == 2:
        features = features.expand(batch, *features.shape)
    dirs = camera.ray_directions(centers.device, torch.float64)
    rho0 = optical_depth / (math.sqrt(2.0 * math.pi) * sigma)                           # (B,K)
    out_f = torch.zeros(batch, features.shape[-1], height * width, dtype=torch.float64)
    out_o = torch.zeros(batch, height * width, dtype=torch.float64)
    for b in range(batch):
        t_mid = centers[b] @ dirs.T                                                      # (K,P)
        lo = (t_mid - margin * sigma[b, :, None]).min().clamp_min(0.0)
        hi = (t_mid + margin * sigma[b, :, None]).max()
        t = torch.linspace(float(lo), float(hi), samples, dtype=torch.float64)
        dt = t[1] - t[0]
        points = t[None, :, None] * dirs[:, None, :]                                     # (P,S,3)
        dist2 = ((points[:, :, None, :] - centers[b][None, None]) ** 2).sum(-1)          # (P,S,K)
        rho_k = rho0[b] * torch.exp(-0.5 * dist2 / sigma[b] ** 2)
        rho = rho_k.sum(-1)                                                              # (P,S)
        # cumulative optical depth by the trapezoid rule
        cum = torch.cat([rho.new_zeros(rho.shape[0], 1),
                         torch.cumsum(0.5 * (rho[:, 1:] + rho[:, :-1]) * dt, 1)], dim=1)
        trans = torch.exp(-cum)
        integrand = trans[..., None] * (rho_k @ features[b])                             # (P,S,C)
        out_f[b] = torch.trapezoid(integrand, dx=dt, dim=1).T
        out_o[b] = torch.trapezoid(trans * rho, dx=dt, dim=1)
    return out_f.view(batch, -1, height, width), out_o.view(batch, height, width)

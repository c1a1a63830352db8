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
are kept (chosen without gradient, then evaluated with gradient), and only kernels with ``c_k`` above
~1e-6 (:data:`SELECT_SCORE`) are considered at all; rays that pass near no kernel are not evaluated.
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
    kernel_index: (B,H*W,M) kernels kept per pixel; weights: (B,H*W,M) their ``alpha``
    (these four are None when rendered with ``dense=False``).
    The non-empty rays only: ray_image, ray_pixel (N,) their image and row-major pixel index,
    ray_features (N,C), ray_opacity (N,). Every other ray has F = 0 and O = 0."""

    features: torch.Tensor | None
    opacity: torch.Tensor | None
    kernel_index: torch.Tensor | None
    weights: torch.Tensor | None
    ray_image: torch.Tensor
    ray_pixel: torch.Tensor
    ray_features: torch.Tensor
    ray_opacity: torch.Tensor


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


# Kernels farther from a ray than this (squared distance in sigmas) are not considered for it: their optical
# depth is below tau * exp(-15) ~ 1e-6 (tau = 4). A ray with no kernel that close is empty.
SELECT_SCORE = 30.0


@torch.no_grad()
def select_kernels(centers: torch.Tensor, sigma: torch.Tensor, camera: PinholeCamera, count: int,
                   max_score: float = SELECT_SCORE) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` kernels with the largest optical depth on each ray, found without gradient.

    centers: (B,K,3); sigma: (B,K). Returns indices (B,H*W,count) and the squared distance of each kernel
    from the ray in units of sigma (B,H*W,count), ascending, ``inf`` where a ray has fewer than ``count``
    kernels within ``max_score`` (those slots hold index 0 and must be ignored). The distance is measured
    in the image (centre projected, radius f sigma / z); each kernel only visits the pixels of its own
    window, so the cost follows K, not K x H x W. The exact optical depths are computed afterwards, with
    gradient, for the chosen kernels only.
    """
    batch, num_kernels, _ = centers.shape
    height, width = camera.size
    num_pixels = height * width
    count = min(count, num_kernels)
    z = centers[..., 2]
    front = z > 0
    z = z.clamp_min(1e-9)
    u = camera.focal * centers[..., 0] / z + camera.principal[0]                       # (B,K) px
    v = camera.focal * centers[..., 1] / z + camera.principal[1]
    inv_r = z / (camera.focal * sigma)                                                  # 1 / pixel radius
    out_index = torch.zeros(batch * num_pixels, count, dtype=torch.long, device=centers.device)
    out_score = torch.full((batch * num_pixels, count), float("inf"), dtype=centers.dtype, device=centers.device)
    if not bool(front.any()):
        return out_index.view(batch, num_pixels, count), out_score.view(batch, num_pixels, count)
    reach = math.sqrt(max_score) / float(inv_r[front].min())                           # px
    half = min(int(math.ceil(reach)), max(height, width))
    offsets = torch.arange(-half, half + 1, device=centers.device)
    cols = u.floor().long()[..., None] + offsets                                        # (B,K,S)
    rows = v.floor().long()[..., None] + offsets
    col_term = ((cols + 0.5 - u[..., None]) * inv_r[..., None]) ** 2
    row_term = ((rows + 0.5 - v[..., None]) * inv_r[..., None]) ** 2
    score = row_term[..., :, None] + col_term[..., None, :]                             # (B,K,S,S)
    inside = ((rows >= 0) & (rows < height))[..., :, None] & ((cols >= 0) & (cols < width))[..., None, :]
    keep = inside & (score < max_score) & front[..., None, None]
    b, k, i, j = keep.nonzero(as_tuple=True)
    ray = b * num_pixels + rows[b, k, i] * width + cols[b, k, j]                        # (n,) global ray id
    cand = score[b, k, i, j]
    # sort by (ray, score): rays apart by more than any score, then rank within each ray
    order = torch.argsort(ray.double() * (2.0 * max_score + 1.0) + cand.double())
    ray, cand, k = ray[order], cand[order], k[order]
    rank = torch.arange(ray.numel(), device=ray.device) - torch.searchsorted(ray, ray)
    top = rank < count
    out_index[ray[top], rank[top]] = k[top]
    out_score[ray[top], rank[top]] = cand[top]
    return out_index.view(batch, num_pixels, count), out_score.view(batch, num_pixels, count)


def render_gaussians(centers: torch.Tensor, sigma, features: torch.Tensor, camera: PinholeCamera,
                     optical_depth: float = DEFAULT_OPTICAL_DEPTH, max_kernels_per_pixel: int = 16,
                     dense: bool = True) -> RenderOutput:
    """Render kernel features to a feature map (differentiable in centres, sigma and features).

    centers: (B,K,3) camera frame; sigma: float, (K,) or (B,K) metres; features: (B,K,C) or (K,C).
    Only rays that pass near a kernel are evaluated (the others are empty), so the cost follows the
    body's area in the image. dense=False skips the (B,C,H,W) maps and returns the non-empty rays only.
    """
    batch, num_kernels, _ = centers.shape
    height, width = camera.size
    num_pixels = height * width
    sigma = torch.as_tensor(sigma, dtype=centers.dtype, device=centers.device)
    sigma = sigma.expand(batch, num_kernels) if sigma.dim() < 2 else sigma
    if features.dim() == 2:
        features = features.expand(batch, *features.shape)
    kernel_index, score = select_kernels(centers.detach(), sigma.detach(), camera, max_kernels_per_pixel)
    per_pixel = kernel_index.shape[-1]
    image_of, pixel_of = torch.isfinite(score[..., 0]).nonzero(as_tuple=True)           # non-empty rays (N,)
    index = kernel_index[image_of, pixel_of]                                             # (N,M)
    chosen = torch.isfinite(score[image_of, pixel_of])                                   # (N,M) real slots

    m = centers[image_of[:, None], index]                                                # (N,M,3)
    s = sigma[image_of[:, None], index]                                                  # (N,M)
    d = camera.ray_directions(centers.device, centers.dtype)[pixel_of][:, None, :]       # (N,1,3)
    dist2 = _cross_norm2(m, d)
    depth = (m * d).sum(-1)                                                              # t_k
    c = optical_depth * torch.exp(-0.5 * dist2 / (s * s))
    c = c * chosen.to(c.dtype)

    # Optical depth of kernel j in front of kernel k, averaged over k's extent along the ray.
    spread = torch.sqrt(s[..., :, None] ** 2 + s[..., None, :] ** 2)
    front = 0.5 * (1.0 + torch.erf((depth[..., :, None] - depth[..., None, :]) / (spread * math.sqrt(2.0))))
    eye = torch.eye(per_pixel, dtype=c.dtype, device=c.device)
    attenuation = ((front * (1.0 - eye)) @ c[..., None]).squeeze(-1)                    # (N,M)
    alpha = -torch.expm1(-c) * torch.exp(-attenuation)
    total = -torch.expm1(-c.sum(-1, keepdim=True))
    alpha = alpha * total / alpha.sum(-1, keepdim=True).clamp_min(1e-12)

    feat = features[image_of[:, None], index]                                            # (N,M,C)
    values = (alpha[:, None, :] @ feat).squeeze(1)                                       # (N,C)
    channels = features.shape[-1]
    sparse = dict(ray_image=image_of, ray_pixel=pixel_of, ray_features=values, ray_opacity=alpha.sum(-1))
    if not dense:
        return RenderOutput(features=None, opacity=None, kernel_index=None, weights=None, **sparse)
    rendered = centers.new_zeros(batch, num_pixels, channels).index_put((image_of, pixel_of), values)
    opacity = centers.new_zeros(batch, num_pixels).index_put((image_of, pixel_of), alpha.sum(-1))
    weights = centers.new_zeros(batch, num_pixels, per_pixel).index_put((image_of, pixel_of), alpha)
    return RenderOutput(features=rendered.transpose(1, 2).reshape(batch, channels, height, width),
                        opacity=opacity.view(batch, height, width), kernel_index=kernel_index, weights=weights,
                        **sparse)


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

"""Occlusion sensitivity heatmaps: per-window errors -> per-pixel maps over the crop -> figures.

A sliding-window run gives one error per (window, joint). A heatmap places each window's error at the
window's anchor (its top-left corner for PARE's official indexing, its centre for dense runs) and fills
the crop from those anchors. Colours use one fixed range for every panel being compared (PARE autoscales
every panel, so its colours cannot be compared across joints or models).
"""
from __future__ import annotations

import numpy as np

CROP = 224


def window_map(values: np.ndarray, anchor_x: np.ndarray, anchor_y: np.ndarray, indexing: str,
               crop_size: int = CROP) -> np.ndarray:
    """Per-pixel map (crop_size, crop_size) from per-window values on a regular window grid.

    values: (W,) error per window; anchor_x, anchor_y: (W,) each window's anchor in crop pixels (its
    top-left corner or its centre, as ``indexing`` says).
    indexing: "top-left" (PARE's script: a window's value covers the stride cell starting at its top-left
    corner) or "center" (the value sits at the window centre; pixels between centres are interpolated
    bilinearly, pixels outside the outermost centres take the nearest centre's value).
    """
    values = np.asarray(values, dtype=np.float64)
    xs, ys = np.unique(anchor_x), np.unique(anchor_y)
    grid = np.full((len(ys), len(xs)), np.nan)
    grid[np.searchsorted(ys, anchor_y), np.searchsorted(xs, anchor_x)] = values
    pix = np.arange(crop_size) + 0.5
    if indexing == "top-left":
        # Each pixel belongs to the last window anchor at or before it.
        col = np.clip(np.searchsorted(xs, pix, side="right") - 1, 0, len(xs) - 1)
        row = np.clip(np.searchsorted(ys, pix, side="right") - 1, 0, len(ys) - 1)
        return grid[row[:, None], col[None, :]]
    if indexing == "center":
        return _bilinear(grid, ys, xs, pix, pix)
    raise ValueError(f"indexing must be 'top-left' or 'center', not {indexing!r}")


def _bilinear(grid, gy, gx, py, px):
    """Bilinear interpolation of ``grid`` sampled at (gy, gx) onto pixel rows py and columns px."""
    def weights(g, p):
        if len(g) == 1:
            return np.zeros(len(p), dtype=int), np.zeros(len(p), dtype=int), np.zeros(len(p))
        hi = np.clip(np.searchsorted(g, p), 1, len(g) - 1)
        lo = hi - 1
        t = np.clip((p - g[lo]) / (g[hi] - g[lo]), 0.0, 1.0)
        return lo, hi, t
    r0, r1, tr = weights(gy, py)
    c0, c1, tc = weights(gx, px)
    top = grid[r0][:, c0] * (1 - tc) + grid[r0][:, c1] * tc
    bottom = grid[r1][:, c0] * (1 - tc) + grid[r1][:, c1] * tc
    return top * (1 - tr[:, None]) + bottom * tr[:, None]


def color_range(maps, percentile: float = 100.0) -> tuple[float, float]:
    """One (vmin, vmax) for a set of maps: 0 .. the given percentile of all finite values."""
    finite = np.concatenate([np.asarray(m, dtype=float).ravel() for m in maps])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    vmax = float(np.percentile(finite, percentile))
    return 0.0, vmax if vmax > 0 else 1.0


def plot_heatmap_grid(crop: np.ndarray, maps: np.ndarray, titles: list[str], vmin: float, vmax: float,
                      out_path, ncols: int = 5, alpha: float = 0.55, suptitle: str = ""):
    """PARE Fig. 2 style: one panel per map, each overlaid on the crop, one colour range, one colour bar.

    crop: (H,W,3) uint8; maps: (P,H,W) errors in mm; titles: P panel titles.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(maps)
    nrows = int(np.ceil(panels / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, 2.3 * nrows + 0.4), squeeze=False)
    image = None
    for ax in axes.ravel():
        ax.axis("off")
    for ax, heat, title in zip(axes.ravel(), maps, titles):
        ax.imshow(crop)
        image = ax.imshow(heat, cmap="jet", vmin=vmin, vmax=vmax, alpha=alpha)
        finite = heat[np.isfinite(heat)]
        low, high = (finite.min(), finite.max()) if finite.size else (np.nan, np.nan)
        ax.set_title(f"{title}\n{low:.0f}-{high:.0f} mm", fontsize=7)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
        bar.set_label("joint error (mm)")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.savefig(out_path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out_path

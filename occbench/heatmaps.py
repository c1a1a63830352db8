"""Occlusion sensitivity heatmaps: per-window errors -> per-pixel maps over the crop -> figures.

A sliding-window run gives one error per (window, joint). A heatmap places each window's error at the
window's anchor (its top-left corner for PARE's official indexing, its centre for dense runs) and fills
the crop from those anchors. Colours use one fixed range for every panel being compared (PARE autoscales
every panel, so its colours cannot be compared across joints or models), on perceptually uniform colour
maps (equal steps in value look like equal steps in colour; jet's bright bands invent edges).
"""
from __future__ import annotations

import numpy as np

CROP = 224
ERROR_CMAP = "viridis"    # absolute joint error
RISE_CMAP = "magma"       # error minus the sample's clean error: a different map so the two are not confused


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


def color_range(maps, low_percentile: float = 0.0, high_percentile: float = 100.0) -> tuple[float, float]:
    """One (vmin, vmax) for a set of maps: the given percentiles of all their finite values.

    Never an empty range (vmax > vmin), and (0, 1) when nothing is finite."""
    finite = np.concatenate([np.asarray(m, dtype=float).ravel() for m in maps])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(finite, [low_percentile, high_percentile]))
    return vmin, vmax if vmax > vmin else vmin + 1.0


def overlay(crop: np.ndarray, heat: np.ndarray, vmin: float, vmax: float, cmap: str, alpha: float) -> np.ndarray:
    """(H,W,3) float RGB in [0,1]: ``heat`` coloured on [vmin, vmax] and blended over the crop; pixels
    without a value (NaN) show the crop alone."""
    import matplotlib
    colours = matplotlib.colormaps[cmap](np.clip((heat - vmin) / (vmax - vmin), 0.0, 1.0))[..., :3]
    base = np.asarray(crop, dtype=np.float64) / 255.0
    weight = np.where(np.isfinite(heat), alpha, 0.0)[..., None]
    return base * (1 - weight) + colours * weight


def plot_heatmap_grid(crop: np.ndarray, maps: np.ndarray, titles: list[str], vmin: float, vmax: float,
                      out_path, ncols: int = 5, alpha: float = 0.65, suptitle: str = "", cmap: str = ERROR_CMAP,
                      label: str = "joint error (mm)"):
    """PARE Fig. 2 style: one panel per map, each overlaid on the crop, one colour range, one colour bar.

    crop: (H,W,3) uint8; maps: (P,H,W) values in mm; titles: P panel titles (each gets the panel's own
    min-max beside it); values outside [vmin, vmax] take the end colours (the colour bar's arrows). The
    panels are blended in numpy and drawn as one image: one matplotlib image per panel cost ~2.5 s a figure.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, height, width = len(maps), maps.shape[1], maps.shape[2]
    nrows = int(np.ceil(panels / ncols))
    gap_x, gap_y = 8, 26                       # white space between panels; room for two title lines
    mosaic = np.ones((nrows * (height + gap_y), ncols * (width + gap_x) - gap_x, 3))
    for k, heat in enumerate(maps):
        row, col = divmod(k, ncols)
        top, left = row * (height + gap_y) + gap_y, col * (width + gap_x)
        mosaic[top:top + height, left:left + width] = overlay(crop, heat, vmin, vmax, cmap, alpha)
    dpi, margin_right, margin_top = 100, 110, 36   # margins in pixels: colour bar, suptitle
    fig = plt.figure(figsize=((mosaic.shape[1] + margin_right) / dpi, (mosaic.shape[0] + margin_top) / dpi),
                     dpi=dpi)
    # figimage draws the pixels as they are (no resampling: sharp and cheap); the axes only place the titles
    fig.figimage(mosaic, xo=0, yo=0, origin="upper")
    ax = fig.add_axes((0.0, 0.0, mosaic.shape[1] / fig.bbox.width, mosaic.shape[0] / fig.bbox.height),
                      zorder=1)             # above the figure image, which is drawn after axes of equal zorder
    ax.set_xlim(0, mosaic.shape[1])
    ax.set_ylim(mosaic.shape[0], 0)
    ax.axis("off")
    for k, (heat, title) in enumerate(zip(maps, titles)):
        row, col = divmod(k, ncols)
        finite = heat[np.isfinite(heat)]
        low, high = (finite.min(), finite.max()) if finite.size else (np.nan, np.nan)
        ax.text(col * (width + gap_x) + width / 2, row * (height + gap_y) + gap_y - 3,
                f"{title}\n{low:.0f} to {high:.0f} mm", ha="center", va="bottom", fontsize=6.5)
    bar_ax = fig.add_axes((1 - 75 / fig.bbox.width, 0.1, 12 / fig.bbox.width, 0.75))
    mappable = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(vmin, vmax), cmap=cmap)
    bar = fig.colorbar(mappable, cax=bar_ax, extend="both")
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9, y=0.995)
    # zlib level 1: 5x faster than the default on these photo-like panels, files ~1.3x larger
    fig.savefig(out_path, dpi=dpi, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return out_path

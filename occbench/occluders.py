"""Occluders as (mask, fill) pairs, composed into batches of occluded crops on the model's device.

An occluder is described by one row of a *window table* (a dict of equal-length numpy columns, one row per
occluded copy of a crop). Geometry is in the pixels of the image the model sees (``input_size``): all
protocol sizes are defined in the canonical 224 crop and scaled by ``input_size / 224`` (rounded half up,
REFERENCE.md 1), and the occluder is drawn at the model's input resolution, so that 3DNBF (320 px) gets a
57 px patch with sharp integer edges exactly as its official code draws it, instead of a 40 px patch
blurred by a later resize.

One occluder shape covers every protocol: a rotated box or ellipse

    centre (cx, cy), half extents (hw, hh), angle a (radians, x axis towards y axis),
    u = (x - cx) cos a + (y - cy) sin a,   v = -(x - cx) sin a + (y - cy) cos a
    box:      -hw <= u < hw  and  -hh <= v < hh      (half-open: a 40 px patch covers exactly 40 px)
    ellipse:  (u / hw)^2 + (v / hh)^2 <= 1

with pixel (i, j) at coordinates x = j, y = i (top-left pixel at 0, like the crop arrays and the 2D joints).
With a = 0 a box is the exact integer window ``[x0, x0 + size) x [y0, y0 + size)`` of PARE's and 3DNBF's
scripts, clipped by the image border.

Fills: a constant colour per window (``fill_r/g/b`` in RGB [0,1]; ImageNet mean = 0 in normalized space), or a
texture patch (``texture`` index into a :class:`TextureBank`, crop corner ``tex_x, tex_y`` in the resized
texture, aligned with the occluder's bounding-box corner).

The window table itself (columns, scaling to the input size, the counter-based draws that choose every
texture, crop corner, angle and colour) lives in :mod:`occbench.windows`; Pascal VOC object occluders in
:mod:`occbench.voc`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from occbench.assets import MissingAssetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
SHAPE_BOX, SHAPE_ELLIPSE = 0, 1
SHAPE_NAMES = {SHAPE_BOX: "box", SHAPE_ELLIPSE: "ellipse"}

# 3DNBF's held-out DTD split (REFERENCE.md 4)
DTD_TEST_CATEGORIES = (
    "banded", "bubbly", "bumpy", "crosshatched", "frilly", "gauzy", "marbled", "matted", "paisley",
    "perforated", "pitted", "polka-dotted", "smeared", "spiralled", "sprinkled", "stained", "stratified",
    "striped", "swirly", "veined")
# Images bundled with scikit-image, used as textures when no DTD root is given (results then not comparable)
SKIMAGE_TEXTURES = ("brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket", "hubble_deep_field",
                    "immunohistochemistry", "coins", "moon", "camera", "colorwheel", "checkerboard", "clock",
                    "cell")


# ----------------------------------------------------------------------------------------- textures
@dataclass
class TextureSource:
    """Where textures come from. ``comparable`` is False for the scikit-image fallback."""

    kind: str                      # "dtd" | "skimage"
    names: list                    # one name per texture (DTD: "category/file.jpg")
    root: str = ""
    comparable: bool = True

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join([self.kind, *self.names]).encode()).hexdigest()[:16]


def dtd_source(dtd_root, categories=DTD_TEST_CATEGORIES) -> TextureSource:
    """DTD test-split textures: ``<root>/images/<category>/*.jpg`` (``root`` may also be the images folder)."""
    root = Path(dtd_root).expanduser()
    images = root / "images" if (root / "images").is_dir() else root
    names = []
    for category in categories:
        folder = images / category
        if not folder.is_dir():
            raise MissingAssetError(
                f"DTD: category folder {folder} not found (expected <dtd-root>/images/<category>/*.jpg for the "
                f"{len(categories)} test categories); get DTD from "
                "https://www.robots.ox.ac.uk/~vgg/data/dtd/ and pass --dtd-root")
        names += sorted(f"{category}/{p.name}" for p in folder.glob("*.jpg"))
    if not names:
        raise MissingAssetError(f"DTD: no .jpg textures under {images}; pass the DTD folder as --dtd-root")
    return TextureSource(kind="dtd", names=names, root=str(images), comparable=True)


def skimage_source() -> TextureSource:
    return TextureSource(kind="skimage", names=list(SKIMAGE_TEXTURES), comparable=False)


class TextureBank:
    """Textures resized so that their short side equals ``short_side`` (the crop size the model sees).

    Decoded textures are kept in a bounded LRU cache (``cache_size`` textures), so memory does not grow
    with the run. ``sizes[t] = (height, width)`` after resizing is known without decoding (image headers).
    """

    def __init__(self, source: TextureSource, short_side: int, cache_size: int = 256):
        self.source = source
        self.short_side = int(short_side)
        self.cache_size = cache_size
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.sizes = np.array([self._resized_size(self._raw_size(t)) for t in range(len(source.names))],
                              dtype=np.int64)

    def __len__(self) -> int:
        return len(self.source.names)

    def _raw_size(self, t: int) -> tuple[int, int]:
        if self.source.kind == "dtd":
            from PIL import Image
            with Image.open(Path(self.source.root) / self.source.names[t]) as image:
                width, height = image.size
            return height, width
        return self._load_raw(t).shape[:2]

    def _resized_size(self, hw) -> tuple[int, int]:
        height, width = hw
        scale = self.short_side / min(height, width)
        return max(self.short_side, int(height * scale)), max(self.short_side, int(width * scale))

    def _load_raw(self, t: int) -> np.ndarray:
        if self.source.kind == "dtd":
            from PIL import Image
            with Image.open(Path(self.source.root) / self.source.names[t]) as image:
                return np.asarray(image.convert("RGB"))
        import skimage.data
        image = np.asarray(getattr(skimage.data, self.source.names[t])())
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return np.ascontiguousarray(image[:, :, :3].astype(np.uint8))

    def get(self, t: int) -> np.ndarray:
        """(H, W, 3) uint8, short side = ``short_side`` (bilinear resize, as 3DNBF's PIL code)."""
        if t in self._cache:
            self._cache.move_to_end(t)
            return self._cache[t]
        from PIL import Image
        height, width = (int(v) for v in self.sizes[t])
        image = np.asarray(Image.fromarray(self._load_raw(t)).resize((width, height), resample=Image.BILINEAR))
        self._cache[t] = image
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return image

    def stack(self, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Unique textures of a batch as one padded uint8 tensor (U, Hmax, Wmax, 3) on ``device``, and the
        batch's indices into it (B,)."""
        indices = np.asarray(indices, dtype=np.int64)
        unique, inverse = np.unique(indices, return_inverse=True)
        images = [self.get(int(t)) for t in unique]
        hmax = max(im.shape[0] for im in images)
        wmax = max(im.shape[1] for im in images)
        bank = np.zeros((len(images), hmax, wmax, 3), dtype=np.uint8)
        for i, im in enumerate(images):
            bank[i, :im.shape[0], :im.shape[1]] = im
        return (torch.from_numpy(bank).to(device, non_blocking=True),
                torch.from_numpy(inverse.reshape(-1)).to(device))


# ----------------------------------------------------------------------------------------- composition
GEOMETRY_COLUMNS = ("occ_cx", "occ_cy", "occ_hw", "occ_hh", "occ_angle", "occ_shape")
FILL_COLUMNS = ("fill_r", "fill_g", "fill_b", "texture", "tex_x", "tex_y")


def occluder_masks(table: dict, height: int, width: int, device) -> torch.Tensor:
    """(B, 1, H, W) bool masks of the occluders in ``table`` (numpy columns of GEOMETRY_COLUMNS, length B).

    One batched tensor expression for all windows; rows with ``occ_hw <= 0`` give an empty mask (clean copy).
    """
    shape = np.asarray(table["occ_shape"])
    angle = np.asarray(table["occ_angle"], dtype=np.float64)
    if ((shape == SHAPE_BOX) | (shape < 0)).all() and (angle == 0).all():
        # axis-aligned boxes (every sliding-window protocol): separable, one broadcast AND
        cx, cy = np.asarray(table["occ_cx"], np.float64), np.asarray(table["occ_cy"], np.float64)
        hw, hh = np.asarray(table["occ_hw"], np.float64), np.asarray(table["occ_hh"], np.float64)
        hw, hh = np.where(shape < 0, 0.0, hw), np.where(shape < 0, 0.0, hh)
        # the same half-open test as the general path, evaluated exactly on the host per row/column
        x_in = torch.as_tensor(_interval(cx - hw, cx + hw, width), device=device)
        y_in = torch.as_tensor(_interval(cy - hh, cy + hh, height), device=device)
        return (y_in[:, :, None] & x_in[:, None, :]).unsqueeze(1)

    def col(name):
        return torch.as_tensor(np.asarray(table[name], dtype=np.float32), device=device).view(-1, 1, 1)

    cx, cy, hw, hh, angle = (col(n) for n in GEOMETRY_COLUMNS[:5])
    is_ellipse = col("occ_shape") == SHAPE_ELLIPSE
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, -1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = (xs - cx) * cos + (ys - cy) * sin
    v = (ys - cy) * cos - (xs - cx) * sin
    box = (u >= -hw) & (u < hw) & (v >= -hh) & (v < hh)
    ellipse = (u / hw.clamp_min(1e-9)) ** 2 + (v / hh.clamp_min(1e-9)) ** 2 <= 1.0
    mask = torch.where(is_ellipse, ellipse, box) & (hw > 0) & (hh > 0)
    return mask.unsqueeze(1)


def _interval(low: np.ndarray, high: np.ndarray, n: int) -> np.ndarray:
    """(B, n) bool: pixel coordinate i in [low, high) per row (empty where high <= low)."""
    coords = np.arange(n, dtype=np.float64)[None, :]
    return (coords >= low[:, None]) & (coords < high[:, None])


def points_inside(table: dict, points: np.ndarray) -> np.ndarray:
    """(B, J) bool: point strictly inside each row's occluder. points: (B, J, 2) x, y in input-size px.

    Boxes use strict inequalities on both sides, as 3DNBF's visibility test (``x0 < x < x1``).
    """
    cx, cy, hw, hh, angle = (np.asarray(table[n], dtype=np.float64)[:, None] for n in GEOMETRY_COLUMNS[:5])
    is_ellipse = np.asarray(table["occ_shape"])[:, None] == SHAPE_ELLIPSE
    x, y = points[..., 0], points[..., 1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (x - cx) * cos + (y - cy) * sin
    v = (y - cy) * cos - (x - cx) * sin
    box = (np.abs(u) < hw) & (np.abs(v) < hh)
    with np.errstate(divide="ignore", invalid="ignore"):
        ellipse = (u / hw) ** 2 + (v / hh) ** 2 < 1.0
    return np.where(is_ellipse, ellipse, box) & (hw > 0) & (hh > 0)


def fill_images(table: dict, height: int, width: int, device, bank: TextureBank | None = None) -> torch.Tensor:
    """Fill of each row: (B, 3, 1, 1) constant colours, or (B, 3, H, W) texture images when the table has
    textures (``texture >= 0``). Texture pixel for image pixel (x, y) = texture[tex_y + y - top, tex_x + x - left]
    where (left, top) is the occluder's bounding-box corner."""
    texture = np.asarray(table["texture"], dtype=np.int64)
    if bank is None or (texture < 0).all():
        rgb = np.stack([np.asarray(table[c], dtype=np.float32) for c in ("fill_r", "fill_g", "fill_b")], 1)
        return torch.as_tensor(rgb, device=device).view(-1, 3, 1, 1)
    textures, which = bank.stack(np.where(texture >= 0, texture, 0), device)
    left = np.floor(np.asarray(table["occ_cx"]) - np.asarray(table["occ_hw"]) + 0.5).astype(np.int64)
    top = np.floor(np.asarray(table["occ_cy"]) - np.asarray(table["occ_hh"]) + 0.5).astype(np.int64)
    off_x = torch.as_tensor(np.asarray(table["tex_x"], dtype=np.int64) - left, device=device)
    off_y = torch.as_tensor(np.asarray(table["tex_y"], dtype=np.int64) - top, device=device)
    iy = (off_y.view(-1, 1) + torch.arange(height, device=device).view(1, -1)).clamp(0, textures.shape[1] - 1)
    ix = (off_x.view(-1, 1) + torch.arange(width, device=device).view(1, -1)).clamp(0, textures.shape[2] - 1)
    gathered = textures[which.view(-1, 1, 1), iy.view(-1, height, 1), ix.view(-1, 1, width)]  # (B,H,W,3)
    return gathered.permute(0, 3, 1, 2).float().div_(255.0)


def compose(clean: torch.Tensor, table: dict, bank: TextureBank | None = None) -> torch.Tensor:
    """Occluded copies: (B, 3, H, W) RGB [0,1] crops (row b of ``table`` applies to ``clean[b]``).

    out = where(mask, fill, clean): one batched op for the whole batch, on ``clean``'s device.
    """
    batch, _, height, width = clean.shape
    mask = occluder_masks(table, height, width, clean.device)
    fill = fill_images(table, height, width, clean.device, bank).to(clean.dtype)
    return torch.where(mask, fill.expand(batch, 3, height, width), clean)

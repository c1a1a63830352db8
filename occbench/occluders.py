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

Every random choice (texture, its crop corner, bar angle, colour, jitter) is a function of
(protocol fingerprint, seed, sample id, window index, draw slot) through :func:`uniforms`, a counter-based
hash, so any single window can be rebuilt on its own (``--replay``).
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from occbench.assets import MissingAssetError

CANONICAL_SIZE = 224
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


def scale_px(value: float, input_size: int) -> int:
    """A length defined at 224 px, at ``input_size`` px, rounded half up (40 -> 57, 80 -> 114, 10 -> 14 at 320)."""
    return int(math.floor(value * input_size / CANONICAL_SIZE + 0.5))


def grid_count(image_size: int, size: int, stride: int) -> int:
    """Windows per axis, ``ceil((image_size - size) / stride + 1)`` (PARE and 3DNBF scripts)."""
    return int(math.ceil((image_size - size) / stride + 1))


def grid_origins(image_size: int, size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major sliding-window grid: (rows (N,), cols (N,)) indices, window n = row * n_axis + col.

    Window n covers ``[col * stride, col * stride + size) x [row * stride, ...)``, clipped by the border.
    """
    n = grid_count(image_size, size, stride)
    rows, cols = np.divmod(np.arange(n * n), n)
    return rows, cols


# ----------------------------------------------------------------------------------------- randomness
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def sample_key(fingerprint: str, seed: int, sample_id: str) -> int:
    """64-bit key of (protocol fingerprint, seed, sample id); stable across processes and platforms."""
    digest = hashlib.blake2b(f"{fingerprint}|{int(seed)}|{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def uniforms(key: int, windows: np.ndarray, slot: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per window, for draw number ``slot`` (0..63) of each window.

    A counter-based generator: the value for (key, window, slot) does not depend on any other draw.
    """
    if not 0 <= slot < 64:
        raise ValueError(f"draw slot {slot} outside 0..63")
    counter = np.asarray(windows, dtype=np.uint64) * np.uint64(64) + np.uint64(slot)
    bits = _splitmix64(_splitmix64(np.full(counter.shape, key, dtype=np.uint64)) ^ counter)
    bits = _splitmix64(bits)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


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


# ----------------------------------------------------------------------------------------- VOC objects
class VocOccluders:
    """Sárándi et al.'s Pascal VOC object occluders (REFERENCE.md 4, 5.4), written from the description.

    Objects: segmented VOC 2012 objects that are not person, not difficult, not truncated, with >= 500 mask
    pixels; the mask border (pixels removed by an 8x8 elliptic erosion) gets alpha 192/255; stored at 0.5x.
    Per window: ``min_objects..max_objects`` objects (default 1..7), each scaled by U(0.2, 1.0) *
    min(W, H) / 256, centred uniformly over the crop, alpha-blended in order. Every draw comes from
    :func:`uniforms`. This is the one protocol composed per window (a few small pastes per copy on the
    device), because each copy holds a different number of objects of different sizes.
    """

    def __init__(self, objects: list, root: str):
        self.objects = objects
        self.root = root

    @classmethod
    def open(cls, voc_root) -> "VocOccluders":
        if voc_root is None:
            raise MissingAssetError(
                "voc-objects needs Pascal VOC 2012 (JPEGImages, Annotations, SegmentationObject): pass "
                "--voc-root VOCdevkit/VOC2012; get it from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/")
        root = Path(voc_root).expanduser()
        if (root / "VOC2012").is_dir():
            root = root / "VOC2012"
        for sub in ("JPEGImages", "Annotations", "SegmentationObject"):
            if not (root / sub).is_dir():
                raise MissingAssetError(f"Pascal VOC: {root / sub} not found; --voc-root must be "
                                        "VOCdevkit/VOC2012 (from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/)")
        key = str(root.resolve())
        if key not in _VOC_CACHE:
            _VOC_CACHE[key] = _load_voc_objects(root)
        if not _VOC_CACHE[key]:
            raise MissingAssetError(f"Pascal VOC: no usable segmented object under {root}")
        return cls(_VOC_CACHE[key], key)

    def draws(self, protocol, sample_id: str, seed: int, window: int, input_size: int):
        """[(object index, scale factor, cx, cy)] pasted on copy ``window`` of ``sample_id``."""
        key = sample_key(protocol.fingerprint(), seed, sample_id)
        w = np.array([window])
        low, high = protocol.min_objects, protocol.max_objects
        count = low + min(int(uniforms(key, w, 0)[0] * (high - low + 1)), high - low)
        out = []
        for k in range(count):
            u = [float(uniforms(key, w, 1 + 4 * k + j)[0]) for j in range(4)]
            index = min(int(u[0] * len(self.objects)), len(self.objects) - 1)
            scale = (0.2 + 0.8 * u[1]) * input_size / 256.0
            out.append((index, scale, u[2] * input_size, u[3] * input_size))
        return out

    def windows(self, protocol, sample_id: str, seed: int, input_size: int) -> dict:
        from occbench.protocol import _empty_table
        table = _empty_table(protocol.copies)
        table["window"] = np.arange(protocol.copies)
        table["occ_shape"][:] = -1
        table["anchor_x"][:] = table["anchor_y"][:] = np.nan
        return table

    def compose(self, base: torch.Tensor, table: dict, sample_ids, protocol, seed: int) -> torch.Tensor:
        import cv2
        images = base.clone()
        size = images.shape[-1]
        for b, (window, sample_id) in enumerate(zip(table["window"], sample_ids)):
            for index, scale, cx, cy in self.draws(protocol, sample_id, seed, int(window), size):
                rgba = self.objects[index]
                height = max(1, int(round(rgba.shape[0] * scale)))
                width = max(1, int(round(rgba.shape[1] * scale)))
                interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
                patch = cv2.resize(rgba, (width, height), interpolation=interp)
                x0, y0 = int(round(cx - width / 2)), int(round(cy - height / 2))
                ix0, iy0 = max(x0, 0), max(y0, 0)
                ix1, iy1 = min(x0 + width, size), min(y0 + height, size)
                if ix1 <= ix0 or iy1 <= iy0:
                    continue
                piece = torch.from_numpy(np.ascontiguousarray(patch[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]))
                piece = piece.to(images.device).permute(2, 0, 1).float() / 255.0
                alpha = piece[3:4]
                region = images[b, :, iy0:iy1, ix0:ix1]
                images[b, :, iy0:iy1, ix0:ix1] = piece[:3] * alpha + region * (1 - alpha)
        return images


_VOC_CACHE: dict = {}


def _load_voc_objects(root: Path) -> list:
    """RGBA uint8 object images (0.5x) from the segmented VOC images."""
    import xml.etree.ElementTree as ET

    import cv2
    from PIL import Image
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (8, 8))
    objects = []
    for seg_path in sorted((root / "SegmentationObject").glob("*.png")):
        xml_path = root / "Annotations" / f"{seg_path.stem}.xml"
        if not xml_path.is_file():
            continue
        boxes = []
        for i, obj in enumerate(ET.parse(xml_path).getroot().findall("object")):
            if (obj.findtext("name") == "person" or obj.findtext("difficult", "0") != "0"
                    or obj.findtext("truncated", "0") != "0"):
                continue
            box = obj.find("bndbox")
            boxes.append((i, [int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")]))
        if not boxes:
            continue
        labels = np.asarray(Image.open(seg_path))
        image = np.asarray(Image.open(root / "JPEGImages" / f"{seg_path.stem}.jpg").convert("RGB"))
        for i, (x0, y0, x1, y1) in boxes:
            mask = (labels[y0:y1, x0:x1] == i + 1).astype(np.uint8) * 255
            if int(mask.sum() // 255) < 500:
                continue
            eroded = cv2.erode(mask, kernel)
            mask[eroded < mask] = 192
            rgba = np.concatenate([image[y0:y1, x0:x1], mask[..., None]], axis=-1)
            small = cv2.resize(rgba, (max(1, rgba.shape[1] // 2), max(1, rgba.shape[0] // 2)),
                               interpolation=cv2.INTER_AREA)
            objects.append(np.ascontiguousarray(small))
    return objects

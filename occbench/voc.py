"""Sárándi et al.'s Pascal VOC object occluders (REFERENCE.md 4, 5.4): segmented VOC objects pasted on crops."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from occbench.assets import MissingAssetError
from occbench.windows import empty_table, sample_key, uniforms


def window_table(copies: int) -> dict:
    """The window table of a VOC protocol: ``copies`` windows that carry only their index (the objects of a
    window are drawn from its index when it is composed, :meth:`VocOccluders.draws`)."""
    table = empty_table(copies)
    table["window"] = np.arange(copies)
    table["occ_shape"][:] = -1
    table["anchor_x"][:] = table["anchor_y"][:] = np.nan
    return table


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

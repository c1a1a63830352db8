"""Reading a dataset's source image with its checks: pixel limit from the header, truncation, decoding.

A bad image must be a failed sample with its reason, never a silently different number: libjpeg decodes a
truncated JPEG with a grey lower part and only a warning on stderr, and a small file can declare a huge
image (a 1 MB PNG of 20000 x 20000 px decodes to 1.2 GB). So the size is read from the header first
(Pillow reads only the header), a JPEG must end with its end-of-image marker, and OpenCV decodes.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

MAX_IMAGE_PIXELS = 50_000_000     # 50 megapixels (e.g. 8660 x 5773); 3DPW frames are 1920 x 1080
MIN_BOX_COVERAGE = 0.02           # the image must cover at least 2 % of a sample's box (a box around
                                  # keypoints inside the image is at least 25 % covered)
_JPEG_EOI = b"\xff\xd9"


class ImageError(ValueError):
    """An image file that cannot be used; the message says why."""


def header_size(path) -> tuple[int, str, str] | None:
    """(pixels, "W x H px", format) from the file header without decoding the pixels; None if Pillow does
    not know the format (OpenCV may still decode it)."""
    import re

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.width * image.height, f"{image.width} x {image.height} px", str(image.format)
    except Image.DecompressionBombError as err:   # above twice Pillow's own limit: it gives only the count
        found = re.search(r"(\d+) pixels", str(err))
        pixels = int(found.group(1)) if found else MAX_IMAGE_PIXELS + 1
        return pixels, f"{pixels:,} px", "?"
    except (OSError, ValueError, SyntaxError):
        return None


def jpeg_is_complete(path) -> bool:
    """Whether a JPEG file ends with the end-of-image marker (trailing padding bytes allowed).

    A file cut short ends inside the compressed data instead. Files with extra data after the marker
    (some cameras append a preview) are checked by decoding them fully with Pillow.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        handle.seek(max(0, size - 4096))
        tail = handle.read().rstrip(b"\x00\r\n ")
    if tail.endswith(_JPEG_EOI):
        return True
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()          # raises OSError "image file is truncated" when it is
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def read_image(path) -> np.ndarray:
    """The image at ``path`` as (H,W,3) uint8 RGB; ImageError (missing, too large, truncated, unreadable)."""
    import cv2

    path = str(path)
    if not os.path.isfile(path):
        raise ImageError(f"image {path} is missing")
    header = header_size(path)
    if header is not None:
        pixels, size, fmt = header
        if pixels > MAX_IMAGE_PIXELS:
            raise ImageError(f"image {path} declares {size}, above the limit of "
                             f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels (occbench.data.images.MAX_IMAGE_PIXELS)")
        if fmt == "JPEG" and not jpeg_is_complete(path):
            raise ImageError(f"image {path} is truncated (the JPEG data ends before its end-of-image marker); "
                             "copy or download it again")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"image {path} is unreadable (corrupt, truncated or not an image)")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:   # formats whose header Pillow cannot read
        raise ImageError(f"image {path} is {image.shape[1]} x {image.shape[0]} px, above the limit of "
                         f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def box_coverage(image_shape, center, scale: float, box_unit: float = 200.0) -> float:
    """Fraction of a sample's square box (side ``box_unit * scale`` px around ``center``) inside the image."""
    height, width = image_shape[:2]
    side = box_unit * float(scale)
    x0, y0 = float(center[0]) - side / 2, float(center[1]) - side / 2
    inside_w = max(0.0, min(x0 + side, width) - max(x0, 0.0))
    inside_h = max(0.0, min(y0 + side, height) - max(y0, 0.0))
    return inside_w * inside_h / (side * side)

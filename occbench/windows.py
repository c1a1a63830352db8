"""The window table: one row per occluded copy of a crop, and the counter-based draws that build it.

Here: its columns, empty and clean tables, geometry at the model's input size (scaling, sliding-window grid)
and the random draws every occluder is built from.

A window table is a dict of equal-length numpy columns (:data:`TABLE_COLUMNS`). Row ``window = -1`` is the
clean copy. Lengths of a protocol are defined at the canonical 224 px crop and scaled to the model's input
size by :func:`scale_px` (REFERENCE.md 1).

Every random choice is a function of (protocol fingerprint, seed, sample id, window index, draw slot) through
:func:`uniforms`, a counter-based hash, so any single window can be rebuilt on its own (``--replay``).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

CANONICAL_SIZE = 224

TABLE_COLUMNS = {
    "window": np.int64, "grid_row": np.int64, "grid_col": np.int64, "x0": np.float64, "y0": np.float64,
    "size": np.float64, "anchor_x": np.float64, "anchor_y": np.float64, "pattern": object, "doc": np.int64,
    "target_joint": np.int64, "occ_cx": np.float64, "occ_cy": np.float64, "occ_hw": np.float64,
    "occ_hh": np.float64, "occ_angle": np.float64, "occ_shape": np.int64, "fill_r": np.float64,
    "fill_g": np.float64, "fill_b": np.float64, "texture": np.int64, "tex_x": np.int64, "tex_y": np.int64,
}


def empty_table(n: int) -> dict:
    """``n`` rows with every column at its 'not applicable' value (-1 indices, empty pattern, zeros)."""
    table = {name: np.zeros(n, dtype=dtype) for name, dtype in TABLE_COLUMNS.items()}
    for name in ("grid_row", "grid_col", "target_joint", "texture"):
        table[name][:] = -1
    table["pattern"][:] = ""
    return table


def clean_table() -> dict:
    """The clean copy as a one-row window table (window -1, no occluder)."""
    table = empty_table(1)
    table["window"][:] = -1
    table["occ_shape"][:] = -1
    return table


def select(table: dict, rows) -> dict:
    """The rows ``rows`` (a bool mask, indices or a slice) of every column."""
    return {name: column[rows] for name, column in table.items()}


def keep_windows(table: dict, windows) -> dict:
    """Only the rows whose ``window`` is in ``windows`` (replay of chosen windows), in table order."""
    return select(table, np.isin(table["window"], np.asarray(list(windows), dtype=np.int64)))


def concatenate(tables: list) -> dict:
    return {name: np.concatenate([t[name] for t in tables]) for name in TABLE_COLUMNS}


# ----------------------------------------------------------------------------------------- geometry
def scale_px(value: float, input_size: int) -> int:
    """A length defined at 224 px, at ``input_size`` px, rounded half up (40 -> 57, 80 -> 114, 10 -> 14 at 320)."""
    return int(math.floor(value * input_size / CANONICAL_SIZE + 0.5))


def grid_count(image_size: int, size: int, stride: int) -> int:
    """Windows per axis, ``ceil((image_size - size) / stride + 1)`` (PARE and 3DNBF scripts)."""
    return int(math.ceil((image_size - size) / stride + 1))


def grid_positions(size: float, stride: float, input_size: int) -> tuple[int, np.ndarray, int]:
    """A protocol's sliding-window grid at the model's input size: (n per axis, window origins (n,) px, side px).

    The grid is defined at 224 px (``n = grid_count(224, size, stride)``, origins ``k * stride``); each origin
    is scaled by ``input_size / 224`` and rounded half up on its own, as the side is. Rounding each position,
    not the stride, gives every model the protocol's exact window count at the same relative positions (a
    stride rounded on its own would make 784 windows of occsens40-dense at 96 px instead of 576).
    Window (row, col) covers ``[origins[col], origins[col] + side) x [origins[row], ...)``, clipped by the border.
    """
    n = grid_count(CANONICAL_SIZE, size, stride)
    origins = np.array([scale_px(k * stride, input_size) for k in range(n)], dtype=np.int64)
    return n, origins, scale_px(size, input_size)


def grid_cells(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major cells of an n x n grid: (rows (n*n,), cols (n*n,)), window index = row * n + col."""
    return np.divmod(np.arange(n * n), n)


# ----------------------------------------------------------------------------------------- randomness
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 arrays."""
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
    bits = splitmix64(splitmix64(np.full(counter.shape, key, dtype=np.uint64)) ^ counter)
    bits = splitmix64(bits)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

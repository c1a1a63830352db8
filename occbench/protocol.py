"""Protocols: one small dataclass of explicit, named parameters, loaded from a readable TOML file.

A protocol says which occluded copies ("windows") of each crop are made and how their errors are reduced.
Built-ins live in ``protocols/*.toml`` (installed as ``occbench.protocols``); a user's own protocol is a TOML
file with the same fields, passed by path. Every field is validated: a wrong name or value is a
:class:`~occbench.errors.UserError` naming the file, the field and the valid choices.

Kinds (REFERENCE.md 5):

- ``clean``: no occluder (window -1, the clean copy, is computed by every protocol anyway).
- ``occsens``: PARE's sliding square patch (``size``, ``stride``, ``fill``, ``indexing``, ``reference``).
- ``advocc``: 3DNBF's sliding textured patch, visible-joint masking, worst window per sample.
- ``hkmr``: HKMR bar / circle / rectangle occluders at degrees of occlusion 1..5, placed on joints.
- ``voc``: Sárándi's Pascal VOC object occluders (needs a VOC root).

All lengths are given at the canonical 224 px crop and scaled by ``input_size / 224`` for the model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from occbench import occluders as occ
from occbench import voc
from occbench import windows as win
from occbench.checks import check_finite, check_name, short_repr
from occbench.errors import UserError

KINDS = ("clean", "occsens", "advocc", "hkmr", "voc")
FILLS = ("mean", "color", "random-color", "texture")
PATTERNS = ("bar", "circle", "rect")
# HKMR Sec. 4 (REFERENCE.md 5.3), at 224 px: DoC 1..5
DOC_BAR_WIDTH = (10, 20, 30, 40, 50)
DOC_CIRCLE_RADIUS = (10, 20, 30, 40, 50)
DOC_RECT_AREA = (3000, 6000, 9000, 12000, 15000)
N_JOINTS = 14
# Limits on sizes: above them a run would take days or draw nothing useful (README "What occbench checks")
MAX_COPIES = 10_000               # copies per sample (hkmr random-joint, voc)
MAX_WINDOWS_PER_SAMPLE = 100_000  # windows per sample at 224 px (stride 1 with size 1 is 50,176)
MAX_OBJECTS = 50                  # voc objects per window

CHOICES = {
    "kind": KINDS,
    "fill": FILLS,
    "indexing": ("top-left", "center"),
    "reference": ("gt", "clean"),
    "reduction": ("per-sample", "pooled-visible"),
    "report": ("mean", "worst"),
    "textures": ("dtd", "skimage"),
    "placement": ("each-joint", "random-joint"),
    "pelvis": ("dataset", "h36m-root", "mid-hip"),
}


@dataclass
class Protocol:
    """One protocol. Lengths in px of the canonical 224 crop; angles in degrees.

    Every field is recorded in run.json; all but ``name`` and ``description`` enter :meth:`fingerprint`,
    which seeds every random draw (so renaming a file does not change its occluders).
    """

    name: str
    kind: str
    description: str = ""
    # sliding window (occsens, advocc)
    size: int = 40                    # square side
    stride: int = 40
    indexing: str = "top-left"        # heatmap cell anchor: window top-left corner (PARE script) or centre
    # fill
    fill: str = "mean"                # mean: ImageNet mean colour (0 after normalization, PARE's default);
                                      # color: fill_color; random-color: seeded uniform RGB per window;
                                      # texture: random texture crop per window
    fill_color: list = field(default_factory=lambda: list(occ.IMAGENET_MEAN))   # RGB in [0,1]
    textures: str = "dtd"             # dtd (needs --dtd-root; else the scikit-image fallback, not comparable)
    # evaluation
    reference: str = "gt"             # gt, or clean: error against the model's own clean prediction (GT-free)
    visible_only: bool = False        # exclude joints strictly inside the occluder or outside the crop
    report: str = "mean"              # mean over windows, or each sample's worst window (mean visible MPJPE)
    reduction: str = "per-sample"     # per-sample (PARE) or pooled-visible (3DNBF AdvOcc)
    pckh_threshold: float = 0.5
    pelvis: str = "dataset"           # dataset: the dataset's own convention; or force h36m-root / mid-hip
    # HKMR synthetic occluders
    patterns: list = field(default_factory=lambda: ["bar"])
    docs: list = field(default_factory=lambda: [1])
    placement: str = "each-joint"     # each-joint: one window per (pattern, doc, joint) centred on GT 2D;
                                      # random-joint: `copies` windows per image on a seeded random joint
                                      # with a seeded random pattern and DoC from the lists (HKMR Table 1)
    copies: int = 1
    bar_length: float = 224.0         # not given by HKMR: a bar spanning the crop
    bar_angle: list = field(default_factory=lambda: [0.0, 180.0])   # uniform range (degrees); equal = fixed
    rect_aspect: list = field(default_factory=lambda: [0.5, 2.0])   # width/height, log-uniform range
    jitter: float = 0.0               # centre offset, uniform in [-jitter, jitter]^2 px
    # Sárándi VOC objects
    min_objects: int = 1
    max_objects: int = 7
    source: str = ""                  # file the protocol was read from

    # ------------------------------------------------------------------ identity
    def params(self) -> dict:
        """All fields as plain JSON values (recorded in run.json)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fingerprint(self) -> str:
        keep = {k: v for k, v in self.params().items() if k not in ("name", "description", "source")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes) -> "Protocol":
        merged = {**self.params(), **changes}
        return validate(merged, origin=f"protocol {self.name!r} with {sorted(changes)}")

    # ------------------------------------------------------------------ geometry
    @property
    def uses_textures(self) -> bool:
        return self.fill == "texture"

    @property
    def uses_voc(self) -> bool:
        """Composed from Pascal VOC objects (needs a VOC root, :class:`occbench.voc.VocOccluders`)."""
        return self.kind == "voc"

    def grid(self, input_size: int):
        """(size_px, nominal stride_px, n_per_axis) at the model's input size; n is the 224 px grid's at every
        size and the window positions are :func:`occbench.windows.grid_positions` (each one scaled)."""
        n, _, size = win.grid_positions(self.size, self.stride, input_size)
        return size, win.scale_px(self.stride, input_size), n

    def n_windows(self, input_size: int = 224) -> int | None:
        """Windows per sample (None where it depends on the sample, e.g. joints without GT 2D)."""
        if self.kind == "clean":
            return 0
        if self.kind in ("occsens", "advocc"):
            return self.grid(input_size)[2] ** 2
        if self.kind == "hkmr" and self.placement == "each-joint":
            return len(self.patterns) * len(self.docs) * N_JOINTS
        return self.copies

    def check_input_size(self, input_size: int) -> None:
        """Refuse a protocol whose lengths round to 0 px at the model's input size (lengths are given at 224
        px and scaled by input_size / 224, rounded half up): a 0 px stride or occluder is no protocol."""
        lengths = {"occsens": ("size", "stride"), "advocc": ("size", "stride"), "hkmr": ("bar_length",)}
        for name in lengths.get(self.kind, ()):
            if name == "bar_length" and "bar" not in self.patterns:
                continue
            value = getattr(self, name)
            if win.scale_px(value, input_size) < 1:
                smallest = math.ceil(win.CANONICAL_SIZE / 2 / input_size)
                raise UserError(f"protocol {self.name!r}: field {name!r} = {value!r} rounds to 0 px at the model's "
                                f"input size {input_size} px ({value} x {input_size}/224); use {name} >= {smallest}")

    def windows(self, sample_id: str, input_size: int, seed: int, joints2d=None, joints2d_valid=None,
                textures: "occ.TextureBank | None" = None, only=None) -> dict:
        """The window table of one sample: dict of numpy columns, one row per occluded copy.

        joints2d: (14,2) GT 2D in 224-crop px (needed by ``hkmr``); only: window indices to keep (replay).
        Columns (:data:`occbench.windows.TABLE_COLUMNS`): ``window``, the occluder geometry and fill (input-size px),
        ``x0, y0, size`` (top-left corner and side in 224 px), ``anchor_x, anchor_y`` (heatmap position,
        224 px), ``grid_row, grid_col``, ``pattern``, ``doc``, ``target_joint`` (-1 where not applicable).
        """
        key = win.sample_key(self.fingerprint(), seed, sample_id)
        if self.kind == "clean":
            table = win.empty_table(0)
        elif self.kind in ("occsens", "advocc"):
            table = self._grid_table(input_size, key, textures)
        elif self.kind == "hkmr":
            table = self._hkmr_table(input_size, key, joints2d, joints2d_valid)
        else:  # voc: the objects of each window are drawn from its index when it is composed
            table = voc.window_table(self.copies)
        if only is not None:
            table = win.keep_windows(table, only)
        return table

    def compose(self, clean, table: dict, sample_ids, seed: int, textures: "occ.TextureBank | None" = None,
                objects: "voc.VocOccluders | None" = None):
        """The occluded copies of a batch of windows: (B,3,H,W) RGB [0,1] at the model's input size.

        clean: (B,3,H,W) clean crops (row b of ``table`` applies to ``clean[b]``); sample_ids: (B,) the sample
        of each row (VOC objects are drawn from it); objects: the VOC objects (``uses_voc``).
        """
        if self.kind == "voc":
            return objects.compose(clean, table, sample_ids, self, seed)
        return occ.compose(clean, table, textures)

    def _fill(self, table, key, textures, clip_w=None, clip_h=None):
        n = len(table["window"])
        windows = table["window"]
        if self.fill in ("mean", "color"):
            color = occ.IMAGENET_MEAN if self.fill == "mean" else self.fill_color
            for c, name in enumerate(("fill_r", "fill_g", "fill_b")):
                table[name][:] = color[c]
        elif self.fill == "random-color":
            for c, name in enumerate(("fill_r", "fill_g", "fill_b")):
                table[name][:] = win.uniforms(key, windows, 4 + c)
        else:
            if textures is None:
                raise UserError(f"protocol {self.name!r} needs textures (fill = 'texture') but none were given")
            t = np.minimum((win.uniforms(key, windows, 0) * len(textures)).astype(np.int64), len(textures) - 1)
            height, width = textures.sizes[t, 0], textures.sizes[t, 1]
            # crop of the (clipped) window's size, as 3DNBF crops the texture to the clipped patch
            w = np.full(n, 1, np.int64) if clip_w is None else clip_w
            h = np.full(n, 1, np.int64) if clip_h is None else clip_h
            table["texture"][:] = t
            table["tex_x"][:] = np.floor(win.uniforms(key, windows, 1) * np.maximum(width - w + 1, 1))
            table["tex_y"][:] = np.floor(win.uniforms(key, windows, 2) * np.maximum(height - h + 1, 1))

    def _grid_table(self, input_size, key, textures):
        n, origins, size = win.grid_positions(self.size, self.stride, input_size)
        rows, cols = win.grid_cells(n)
        table = win.empty_table(n * n)
        table["window"] = np.arange(n * n)
        table["grid_row"], table["grid_col"] = rows, cols
        left, top = origins[cols], origins[rows]
        table["occ_cx"], table["occ_cy"] = left + size / 2.0, top + size / 2.0
        table["occ_hw"][:] = size / 2.0
        table["occ_hh"][:] = size / 2.0
        table["occ_shape"][:] = occ.SHAPE_BOX
        to224 = win.CANONICAL_SIZE / input_size
        table["x0"], table["y0"] = left * to224, top * to224
        table["size"][:] = size * to224
        offset = 0.0 if self.indexing == "top-left" else size / 2.0
        table["anchor_x"], table["anchor_y"] = (left + offset) * to224, (top + offset) * to224
        clip_w = np.minimum(left + size, input_size) - left
        clip_h = np.minimum(top + size, input_size) - top
        self._fill(table, key, textures, clip_w, clip_h)
        return table

    def _hkmr_table(self, input_size, key, joints2d, joints2d_valid):
        if joints2d is None:
            raise UserError("needs GT 2D joints (HKMR occluders are centred on them)")
        joints2d = np.asarray(joints2d, dtype=np.float64)
        valid = (np.ones(N_JOINTS, bool) if joints2d_valid is None else np.asarray(joints2d_valid, bool))
        valid &= np.isfinite(joints2d).all(axis=1)
        n_p, n_d = len(self.patterns), len(self.docs)
        if self.placement == "each-joint":
            windows = np.arange(n_p * n_d * N_JOINTS)
            p_idx, rest = np.divmod(windows, n_d * N_JOINTS)
            d_idx, joint = np.divmod(rest, N_JOINTS)
            keep = valid[joint]
            windows, p_idx, d_idx, joint = windows[keep], p_idx[keep], d_idx[keep], joint[keep]
        else:
            windows = np.arange(self.copies)
            candidates = np.flatnonzero(valid)
            if len(candidates) == 0:
                raise UserError("no joint with valid GT 2D to place an occluder on")
            pick = lambda slot, n: np.minimum((win.uniforms(key, windows, slot) * n).astype(np.int64), n - 1)
            joint = candidates[pick(8, len(candidates))]
            p_idx, d_idx = pick(9, n_p), pick(10, n_d)
        table = win.empty_table(len(windows))
        table["window"] = windows
        scale = input_size / win.CANONICAL_SIZE
        pattern = np.asarray(self.patterns, dtype=object)[p_idx] if len(windows) else np.array([], object)
        doc = np.asarray(self.docs, dtype=np.int64)[d_idx] if len(windows) else np.array([], np.int64)
        jitter = self.jitter * scale
        cx = joints2d[joint, 0] * scale + (win.uniforms(key, windows, 11) * 2 - 1) * jitter
        cy = joints2d[joint, 1] * scale + (win.uniforms(key, windows, 12) * 2 - 1) * jitter
        a0, a1 = self.bar_angle
        angle = np.deg2rad(a0 + (a1 - a0) * win.uniforms(key, windows, 13))
        r0, r1 = math.log(self.rect_aspect[0]), math.log(self.rect_aspect[1])
        aspect = np.exp(r0 + (r1 - r0) * win.uniforms(key, windows, 14))
        hw = np.zeros(len(windows))
        hh = np.zeros(len(windows))
        shape = np.full(len(windows), occ.SHAPE_BOX)
        for name in PATTERNS:
            sel = pattern == name
            d = doc[sel] - 1
            if name == "bar":
                hw[sel] = win.scale_px(self.bar_length, input_size) / 2.0
                hh[sel] = np.array([win.scale_px(w, input_size) for w in DOC_BAR_WIDTH])[d] / 2.0
            elif name == "circle":
                radius = np.array([win.scale_px(r, input_size) for r in DOC_CIRCLE_RADIUS])[d]
                hw[sel] = hh[sel] = radius
                shape[sel] = occ.SHAPE_ELLIPSE
            else:
                side = np.sqrt(np.array(DOC_RECT_AREA, dtype=np.float64)[d]) * scale
                hw[sel] = side * np.sqrt(aspect[sel]) / 2.0
                hh[sel] = side / np.sqrt(aspect[sel]) / 2.0
        table["occ_angle"] = np.where(pattern == "bar", angle, 0.0)
        table["occ_cx"], table["occ_cy"], table["occ_hw"], table["occ_hh"] = cx, cy, hw, hh
        table["occ_shape"] = shape
        table["pattern"], table["doc"], table["target_joint"] = pattern.astype(object), doc, joint
        to224 = 1.0 / scale
        extent = np.maximum(hw, hh)
        table["x0"], table["y0"] = (cx - extent) * to224, (cy - extent) * to224
        table["size"] = 2 * extent * to224
        table["anchor_x"], table["anchor_y"] = cx * to224, cy * to224
        self._fill(table, key, None)
        return table


# ---------------------------------------------------------------------------------- loading / validation
FIELD_TYPES = {f.name: f for f in dataclasses.fields(Protocol)}


def _check_type(name, value, default, origin):
    def bad(expected):
        return UserError(f"{origin}: field {name!r} must be {expected}, got {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int) and not isinstance(default, bool):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
    elif isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("a number")
        value = float(value)
        check_finite(value, name, origin)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise bad("a list")
        check_finite(value, name, origin)
    return value


def validate(data: dict, origin: str = "protocol") -> Protocol:
    """A checked :class:`Protocol` from a dict (a parsed TOML file). ``origin`` names the file in errors."""
    unknown = sorted(set(data) - set(FIELD_TYPES))
    if unknown:
        raise UserError(f"{origin}: unknown field {unknown[0]!r}; valid fields: {', '.join(FIELD_TYPES)}")
    for required in ("name", "kind"):
        if required not in data:
            raise UserError(f"{origin}: missing required field {required!r}")
    defaults = Protocol(name="_", kind="clean").params()
    values = {}
    for name, value in data.items():
        values[name] = _check_type(name, value, defaults[name], origin)
        if name in CHOICES and values[name] not in CHOICES[name]:
            raise UserError(f"{origin}: field {name!r} = {value!r} is not one of {', '.join(CHOICES[name])}")
    check_name(values["name"], f"{origin}: field 'name' =")
    protocol = Protocol(**values)
    _check_values(protocol, origin)
    return protocol


def _check_values(p: Protocol, origin: str) -> None:
    def fail(name, why):
        raise UserError(f"{origin}: field {name!r} = {short_repr(getattr(p, name))}: {why}")
    if p.size <= 0 or p.size > win.CANONICAL_SIZE:
        fail("size", "must be in 1..224 (px of the 224 crop)")
    if not 1 <= p.stride <= win.CANONICAL_SIZE:
        fail("stride", "must be in 1..224 (px of the 224 crop)")
    if len(p.fill_color) != 3 or not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in p.fill_color):
        fail("fill_color", "must be [r, g, b] with values in [0, 1]")
    if not p.patterns or any(x not in PATTERNS for x in p.patterns):
        fail("patterns", f"must be a non-empty list of {', '.join(PATTERNS)}")
    if not p.docs or any(not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= 5 for d in p.docs):
        fail("docs", "must be a non-empty list of degrees of occlusion 1..5")
    for name in ("bar_angle", "rect_aspect"):
        pair = getattr(p, name)
        if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair) or pair[0] > pair[1]:
            fail(name, "must be a range [low, high] of two numbers with low <= high")
    if p.rect_aspect[0] <= 0:
        fail("rect_aspect", "aspect ratios must be positive")
    if not 1 <= p.copies <= MAX_COPIES:
        fail("copies", f"must be in 1..{MAX_COPIES}")
    if not 1 <= p.min_objects <= p.max_objects:
        fail("min_objects", "need 1 <= min_objects <= max_objects")
    if p.max_objects > MAX_OBJECTS:
        fail("max_objects", f"must be in 1..{MAX_OBJECTS}")
    if not 0 < p.bar_length <= 10 * win.CANONICAL_SIZE:
        fail("bar_length", f"must be in (0, {10 * win.CANONICAL_SIZE}] px")
    if not 0 <= p.jitter <= win.CANONICAL_SIZE:
        fail("jitter", f"must be in [0, {win.CANONICAL_SIZE}] px")
    if p.kind == "advocc" and p.fill != "texture":
        fail("fill", "advocc protocols use fill = 'texture'")
    if not 0 < p.pckh_threshold <= 10:
        fail("pckh_threshold", "must be in (0, 10] (a fraction of the head size)")
    n_windows = p.n_windows(win.CANONICAL_SIZE)
    if n_windows is not None and n_windows > MAX_WINDOWS_PER_SAMPLE:
        fail("stride" if p.kind in ("occsens", "advocc") else "docs",
             f"makes {n_windows} windows per sample, above the limit of {MAX_WINDOWS_PER_SAMPLE}")


def builtin_names() -> list[str]:
    folder = resources.files("occbench.protocols")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_protocol(name_or_path, **overrides) -> Protocol:
    """A built-in protocol by name (``occbench protocols`` lists them) or a TOML file by path.

    overrides: field values replacing the file's (e.g. ``size=60, stride=20``), validated the same way.
    """
    if isinstance(name_or_path, Protocol):
        return name_or_path.replace(**overrides) if overrides else name_or_path
    text_name = str(name_or_path)
    path = Path(text_name).expanduser()
    if text_name.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise UserError(f"protocol file {path} not found")
        origin, text = str(path), path.read_text()
    else:
        names = builtin_names()
        if text_name not in names:
            raise UserError(f"unknown protocol {text_name!r}; valid names: {', '.join(names)} (or a .toml path)")
        resource = resources.files("occbench.protocols") / f"{text_name}.toml"
        origin, text = f"protocols/{text_name}.toml", resource.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{origin}: not valid TOML ({err})") from None
    data = {**data, **overrides, "source": origin}
    return validate(data, origin=origin)

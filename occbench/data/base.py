"""The Dataset object every reader returns: annotation arrays in memory, crops and GT made per sample.

A reader turns its file format into :class:`Records` (plain arrays, one row per person instance);
:class:`Dataset` turns a row into a :class:`~occbench.data.sample.Sample`:

1. read the image, cut the SPIN crop (occbench.data.crop);
2. ground truth 3D: SMPL pose/betas through the (gendered) body model, LSP-14 from the H36M regressor, the
   pelvis of the recorded convention subtracted from joints and vertices; or given 3D joints (Human3.6M ``S``);
3. GT 2D LSP-14 in crop px: given image-px keypoints mapped into the crop, or the camera projection of the
   GT 3D joints when the reader gives a camera (3DPW sequence files).

SMPL ground truth is computed in chunks of ``gt_chunk`` consecutive samples (one batched body-model call per
chunk and gender) and the last chunk is cached, so a sequential pass costs one forward per chunk.
Per-sample problems (missing image, NaNs) raise :class:`BadSample`; the engine records and skips them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from occbench.assets import sha256_of
from occbench.data.crop import CROP_SIZE, crop_image, transform_points
from occbench.data.images import MIN_BOX_COVERAGE, ImageError, box_coverage, read_image
from occbench.data.joints import H36M_PELVIS, LSP14_LEFT_HIP, LSP14_RIGHT_HIP
from occbench.data.sample import Sample
from occbench.errors import UserError

PELVIS_CONVENTIONS = ("h36m-root", "mid-hip")
GENDERS = ("neutral", "male", "female")


class BadSample(UserError):
    """One sample cannot be used (missing image, NaNs, ...). ``sample_id`` names it; a run skips it."""

    def __init__(self, message: str, sample_id: str = "", index: int | None = None):
        super().__init__(message)
        self.sample_id = sample_id
        self.index = index


def normalize_gender(value) -> str:
    """'m'/'male'/0 -> 'male', 'f'/'female'/1 -> 'female', 'n'/'neutral'/'' -> 'neutral' (SPIN: 0 = m, 1 = f)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, (int, np.integer)):
        return {0: "male", 1: "female"}.get(int(value), "neutral")
    text = str(value).strip().lower()
    if text in ("m", "male"):
        return "male"
    if text in ("f", "female"):
        return "female"
    if text in ("n", "neutral", "", "none", "-1"):
        return "neutral"
    raise ValueError(f"unknown gender {value!r}")


@dataclass
class Records:
    """Annotation arrays of one dataset, N rows (person instances). Image px unless said otherwise.

    sample_ids: N unique strings; image_paths: N absolute paths
    center: (N,2), scale: (N,) SPIN box (side 200*scale px)
    pose: (N,72) SMPL axis-angle, betas: (N,10), genders: N of GENDERS, has_smpl: (N,) bool; or None
    cam_R: (N,3,3), cam_t: (N,3), trans: (N,3), cam_K: (N,3,3): optional camera (world->camera R, t; SMPL
        world translation trans; intrinsics K). ``pose`` is always camera-frame (global orient = R @ world
        orient); with a camera, GT 2D is the projection of the camera-frame GT joints
    joints3d: (N,14,3) given LSP-14 3D joints in metres (not pelvis-subtracted), joints3d_pelvis (N,3); or None
    joints2d: (N,14,3) LSP-14 image px + validity (>0 = known); or None (then projected when a camera is given)
    meta: per-sample lists/arrays (e.g. "sequence") copied into Sample.meta
    """

    sample_ids: list
    image_paths: list
    center: np.ndarray
    scale: np.ndarray
    pose: np.ndarray | None = None
    betas: np.ndarray | None = None
    genders: list | None = None
    has_smpl: np.ndarray | None = None
    cam_R: np.ndarray | None = None
    cam_t: np.ndarray | None = None
    trans: np.ndarray | None = None
    cam_K: np.ndarray | None = None
    joints3d: np.ndarray | None = None
    joints3d_pelvis: np.ndarray | None = None
    joints2d: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def select(self, keep: np.ndarray) -> "Records":
        """Rows where ``keep`` (bool (N,) or index array) holds."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, dtype=np.int64)

        def take(value):
            if value is None:
                return None
            if isinstance(value, list):
                return [value[i] for i in idx]
            return np.asarray(value)[idx]

        out = Records(**{k: take(v) for k, v in self.__dict__.items() if k != "meta"})
        out.meta = {k: take(v) for k, v in self.meta.items()}
        return out


def file_provenance(paths) -> dict:
    """{path: {sha256, bytes}} for annotation files."""
    return {str(p): {"sha256": sha256_of(p), "bytes": os.path.getsize(p)} for p in paths}


class Dataset:
    """A dataset of person crops with ground truth.

    ``len(ds)``, ``ds[i] -> Sample``, ``ds.name``, ``ds.sample_ids``, ``ds.conventions`` (how GT was made:
    pelvis, joint set, bbox factor, gendered GT, stand-in body), ``ds.provenance`` (files, sha256, sizes).
    """

    def __init__(self, name: str, records: Records, *, conventions: dict, provenance: dict,
                 pelvis: str = "h36m-root", gendered: bool = True, smpl_dir=None, data_dir=None,
                 crop_size: int = CROP_SIZE, gt_chunk: int = 64, device: str = "cpu"):
        if pelvis not in PELVIS_CONVENTIONS:
            raise UserError(f"pelvis convention {pelvis!r} unknown; use one of {', '.join(PELVIS_CONVENTIONS)}")
        self.name = name
        self.records = records
        self.pelvis = pelvis
        self.gendered = gendered
        self.crop_size = crop_size
        self.gt_chunk = max(1, int(gt_chunk))
        self.device = device
        self._smpl_dir, self._data_dir = smpl_dir, data_dir
        self._bodies: dict = {}
        self._chunk_cache: tuple | None = None
        self.sample_ids = list(records.sample_ids)
        if len(set(self.sample_ids)) != len(self.sample_ids):
            raise UserError(f"{name}: sample ids are not unique; the annotation file lists a person twice")
        self._index = {sid: i for i, sid in enumerate(self.sample_ids)}
        self.provenance = dict(provenance, n_samples=len(records))
        self.conventions = dict(conventions, pelvis=pelvis, joint_set="lsp14", crop_size=crop_size)
        uses_smpl = records.pose is not None and (records.has_smpl is None or bool(np.any(records.has_smpl)))
        self.conventions["gendered_gt"] = bool(gendered and uses_smpl and records.genders is not None
                                               and any(g != "neutral" for g in records.genders))
        if uses_smpl:
            body = self.body_model("neutral")
            self.conventions["body_model_standin"] = bool(getattr(body, "is_standin", False))
            self.provenance["body_model"] = getattr(body, "provenance", {})
        else:
            self.conventions["body_model_standin"] = False

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the annotations by content: every annotation array, the sample ids and the image
        file names (not their folder, so a moved dataset still resumes; image bytes are not read). A resumed
        run whose dataset has another fingerprint is refused (README "What occbench checks")."""
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256()

            def add(name, value):
                digest.update(name.encode())
                if value is None:
                    digest.update(b"none")
                elif isinstance(value, (list, tuple)) and not (value and isinstance(value[0], np.ndarray)):
                    items = [Path(str(v)).name if name == "image_paths" else str(v) for v in value]
                    digest.update(json.dumps(items).encode())
                else:
                    array = np.ascontiguousarray(np.asarray(value))
                    if array.dtype == object:
                        digest.update(json.dumps([str(v) for v in array.ravel()]).encode())
                    else:
                        digest.update(f"{array.dtype.str}{array.shape}".encode() + array.tobytes())

            for name in sorted(self.records.__dict__):
                if name != "meta":
                    add(name, getattr(self.records, name))
            for name in sorted(self.records.meta):
                add(f"meta.{name}", self.records.meta[name])
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def index_of(self, sample_id: str) -> int:
        return self._index[sample_id]

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {len(self)} samples, pelvis={self.pelvis})"

    # ------------------------------------------------------------------ body models and GT
    def body_model(self, gender: str):
        """The body model the SMPL ground truth is made with (the stand-in when no SMPL files are found),
        loaded once per gender on the dataset's device."""
        if gender not in self._bodies:
            from occbench.body import load_body_model
            body = load_body_model(smpl_dir=self._smpl_dir, data_dir=self._data_dir, gender=gender)
            self._bodies[gender] = body.to(self.device).eval()
        return self._bodies[gender]

    def _gt_chunk(self, chunk: int) -> dict:
        """SMPL GT for samples [chunk*C, (chunk+1)*C): joints3d (C,14,3), vertices (C,6890,3) pelvis-
        subtracted, joints_cam (C,14,3) camera-frame LSP-14 (for projection), valid (C,) bool."""
        if self._chunk_cache is not None and self._chunk_cache[0] == chunk:
            return self._chunk_cache[1]
        import torch

        r = self.records
        lo, hi = chunk * self.gt_chunk, min(len(r), (chunk + 1) * self.gt_chunk)
        n = hi - lo
        out = {"joints3d": np.full((n, 14, 3), np.nan, np.float32),
               "vertices": np.full((n, 6890, 3), np.nan, np.float32),
               "joints_cam": np.full((n, 14, 3), np.nan, np.float32),
               "valid": np.zeros(n, bool)}
        has = np.ones(n, bool) if r.has_smpl is None else np.asarray(r.has_smpl[lo:hi], bool).copy()
        pose, betas = r.pose[lo:hi], r.betas[lo:hi]
        has &= np.isfinite(pose).all(1) & np.isfinite(betas).all(1)
        genders = np.array([g if self.gendered else "neutral" for g in (r.genders[lo:hi] if r.genders
                                                                          else ["neutral"] * n)])
        with torch.no_grad():
            for gender in GENDERS:
                rows = np.flatnonzero(has & (genders == gender))
                if rows.size == 0:
                    continue
                body = self.body_model(gender)
                p = torch.as_tensor(pose[rows], dtype=torch.float32, device=self.device)
                b = torch.as_tensor(betas[rows], dtype=torch.float32, device=self.device)
                res = body.forward_axis_angle(p, b)
                verts, lsp, h36m = res.vertices, res.joints_lsp, res.joints_h36m
                if r.cam_R is not None:
                    # pose is camera-frame: R SMPL(pose_world) = SMPL(pose_cam) - J0 + R J0 (the root
                    # rotation turns the body about the root joint J0), so the camera-frame mesh is
                    # SMPL(pose_cam) + R (J0 + trans) + t - J0.
                    rot = torch.as_tensor(r.cam_R[lo:hi][rows], dtype=torch.float32, device=self.device)
                    t = torch.as_tensor(r.cam_t[lo:hi][rows], dtype=torch.float32, device=self.device)
                    tr = torch.as_tensor(r.trans[lo:hi][rows], dtype=torch.float32, device=self.device)
                    root = res.joints_smpl[:, 0]
                    offset = ((root + tr)[:, None] @ rot.transpose(1, 2))[:, 0] + t - root
                    out["joints_cam"][rows] = (lsp + offset[:, None]).cpu().numpy()
                pelvis = self._pelvis_of(h36m, lsp)
                out["joints3d"][rows] = (lsp - pelvis).cpu().numpy()
                out["vertices"][rows] = (verts - pelvis).cpu().numpy()
                out["valid"][rows] = True
        self._chunk_cache = (chunk, out)
        return out

    def _pelvis_of(self, h36m, lsp):
        if self.pelvis == "h36m-root":
            return h36m[:, H36M_PELVIS:H36M_PELVIS + 1]
        return (lsp[:, LSP14_RIGHT_HIP:LSP14_RIGHT_HIP + 1] + lsp[:, LSP14_LEFT_HIP:LSP14_LEFT_HIP + 1]) / 2

    # ------------------------------------------------------------------ one sample
    def _bad(self, i: int, what: str) -> BadSample:
        sid = self.sample_ids[i]
        return BadSample(f"{self.name}: sample {i} ({sid}): {what}", sample_id=sid, index=i)

    def load_image(self, i: int) -> np.ndarray:
        """Full source image of sample i, (H,W,3) uint8 RGB (checked: :mod:`occbench.data.images`)."""
        path = self.records.image_paths[i]
        try:
            return read_image(path)
        except ImageError as err:
            hint = (" (put the dataset's images there or pass image_root=/the/folder/holding/them)"
                    if not os.path.isfile(path) else "")
            raise self._bad(i, f"{err}{hint}") from None

    def part_labels(self, i: int) -> np.ndarray | None:
        """(crop,crop) uint8 part-label crop of sample i (0 background, 1..24 SMPL part + 1), for PARE-style
        attention supervision; None when the dataset has no label images (only occbench's synthetic sets do)."""
        import cv2

        paths = self.records.meta.get("part_label_path")
        if paths is None:
            return None
        labels = cv2.imread(paths[i], cv2.IMREAD_UNCHANGED)
        if labels is None:
            raise self._bad(i, f"part-label image {paths[i]} is missing or unreadable; regenerate the set")
        return crop_image(labels, self.records.center[i], float(self.records.scale[i]), self.crop_size,
                          nearest=True)

    def __getitem__(self, i: int) -> Sample:
        return self.sample(i)

    def sample(self, i: int, model_input_size: int | None = None) -> Sample:
        """Sample ``i``; with ``model_input_size`` (other than the crop size) ``Sample.model_crop`` is that many
        pixels cut from the source image with the same box, as the model's own pipeline crops (3DNBF: 320 px),
        instead of the 224 px crop resized. Geometry (2D joints, occluders' 224 px columns) stays in the
        224 px canonical crop."""
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"dataset index must be an int, got {type(i).__name__}")
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range ({len(self)} samples)")
        i = int(i)
        r = self.records
        center, scale = np.asarray(r.center[i], np.float64), float(r.scale[i])
        if not (np.isfinite(center).all() and np.isfinite(scale) and scale > 0):
            raise self._bad(i, f"box center {center.tolist()} / scale {scale} is not finite and positive; "
                               "fix or drop this row of the annotation file")
        has_smpl = r.pose is not None and (r.has_smpl is None or bool(r.has_smpl[i]))
        if has_smpl:
            for key, arr in (("pose", r.pose[i]), ("betas", r.betas[i])):
                if not np.isfinite(arr).all():
                    raise self._bad(i, f"'{key}' contains NaN/inf; fix or drop this row of the annotation file")
        if r.joints3d is not None and not has_smpl and not np.isfinite(r.joints3d[i]).all():
            raise self._bad(i, "3D joints ('S') contain NaN/inf; fix or drop this row of the annotation file")

        image = self.load_image(i)
        coverage = box_coverage(image.shape, center, scale)
        if coverage < MIN_BOX_COVERAGE:
            raise self._bad(i, f"image {r.image_paths[i]} ({image.shape[1]} x {image.shape[0]} px) covers only "
                               f"{coverage:.1%} of the sample's box (side {200 * scale:.0f} px at "
                               f"{np.round(center, 1).tolist()}); is it the image the annotation was made on?")
        crop = crop_image(image, center, scale, self.crop_size)
        model_crop = None
        if model_input_size is not None and int(model_input_size) != self.crop_size:
            model_crop = crop_image(image, center, scale, int(model_input_size))

        joints3d = vertices = joints2d = valid2d = None
        gender = None
        if has_smpl:
            gt = self._gt_chunk(i // self.gt_chunk)
            k = i % self.gt_chunk
            joints3d, vertices = gt["joints3d"][k].copy(), gt["vertices"][k].copy()
            gender = (r.genders[i] if (r.genders and self.gendered) else "neutral")
            if r.joints2d is None and r.cam_K is not None:
                cam = gt["joints_cam"][k].astype(np.float64)
                uvw = cam @ np.asarray(r.cam_K[i], np.float64).T
                in_front = uvw[:, 2] > 1e-6
                uv = uvw[:, :2] / np.where(in_front, uvw[:, 2], 1.0)[:, None]
                joints2d_img = np.concatenate([uv, in_front[:, None].astype(np.float64)], axis=1)
                joints2d = transform_points(joints2d_img, center, scale, self.crop_size)
        elif r.joints3d is not None:
            joints3d = (np.asarray(r.joints3d[i], np.float64)
                        - np.asarray(r.joints3d_pelvis[i], np.float64)[None]).astype(np.float32)
        if r.joints2d is not None:
            joints2d = transform_points(r.joints2d[i], center, scale, self.crop_size)
        if joints2d is not None:
            valid2d = (joints2d[:, 2] > 0) & np.isfinite(joints2d[:, :2]).all(1)
            joints2d = np.where(valid2d[:, None], joints2d[:, :2], 0.0).astype(np.float32)

        meta = {k: (v[i].item() if isinstance(v, np.ndarray) and v.ndim == 1 else v[i]) for k, v in r.meta.items()}
        return Sample(
            sample_id=self.sample_ids[i], crop=crop, center=center.astype(np.float32), scale=scale,
            joints3d=joints3d, vertices=vertices, joints2d=joints2d, joints2d_valid=valid2d,
            pose=np.asarray(r.pose[i], np.float32) if has_smpl else None,
            betas=np.asarray(r.betas[i], np.float32) if has_smpl else None,
            gender=gender, image_path=str(r.image_paths[i]), meta=meta, model_crop=model_crop)

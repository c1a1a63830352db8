"""File-format readers: each turns one format into :class:`occbench.data.base.Records`.

- :func:`read_spin_npz`: SPIN / PARE preprocessed npz (imgname, center, scale, pose, shape, gender, has_smpl,
  S (N,24,4), part (N,24,3), openpose) -- 3dpw_all_test_with_mmpose.npz, 3doh_test.npz,
  h36m_valid_protocol{1,2}.npz, and occbench's synthetic sets.
- :func:`read_3dpw_sequences`: official 3DPW sequenceFiles/<split>/*.pkl + imageFiles/<seq>/image_XXXXX.jpg.
- :func:`read_humandata`: mmhuman3d HumanData npz (3DNBF's pw3d_test_w_kp2d_ds30_op.npz).

Bad files raise UserError naming the file and what to do.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import numpy as np

from occbench import safe_pickle
from occbench.data.base import Records, normalize_gender
from occbench.data.crop import DEFAULT_BBOX_FACTOR, bbox_from_keypoints
from occbench.data.joints import (HUMANDATA_NUM_KEYPOINTS, HUMANDATA_TO_J14_CANDIDATES, J24_HEAD_TOP_LSP,
                                  J24_LEFT_HIP, J24_PELVIS, J24_RIGHT_HIP, J24_TO_J14, PW3D_OCC_SEQUENCES,
                                  PW3D_TEST_SEQUENCES)
from occbench.errors import UserError



# ---------------------------------------------------------------------------------------------- helpers
def load_npz(path, object_arrays: bool = False) -> dict:
    """All arrays of an npz as a dict; a truncated/corrupt file -> UserError naming it.

    object_arrays: also read arrays of Python objects (HumanData's dicts). Those are stored as pickles, so
    they are read with occbench's restricted unpickler (numpy arrays and plain values only; anything else
    is refused), never with ``allow_pickle=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found")
    out = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    out[key] = npz[key]
                except ValueError as err:
                    if "allow_pickle" not in str(err):
                        raise
                    if not object_arrays:
                        raise UserError(f"{path}: key {key!r} holds Python objects (a pickle), which this "
                                        "format does not have; pass the right file") from None
                    out[key] = _object_array(npz.zip, key, path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise UserError(f"{path}: cannot read this npz ({type(err).__name__}: {err}); the file is truncated "
                        "or not an npz -- download or generate it again") from None
    return out


def _object_array(archive: zipfile.ZipFile, key: str, path) -> np.ndarray:
    """One object array of an npz, unpickled with the restricted unpickler (.npy header, then a pickle)."""
    from numpy.lib import format as npy

    with archive.open(f"{key}.npy") as member:
        version = npy.read_magic(member)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
        if not dtype.hasobject:
            raise ValueError(f"key {key!r}: unexpected non-object array behind a pickle error")
        array = safe_pickle.load(member, where=f"{path} [{key}]")
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise ValueError(f"key {key!r}: the pickled object array does not match its header {shape}")
    return array


def require(data: dict, keys, path, fmt: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(map(repr, missing))} (has: {', '.join(sorted(data))}); "
                        f"this is not a {fmt} file -- pass the right file or format")


def check_rows(arr, n: int, key: str, path, shape_tail=None) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.shape[0] != n or (shape_tail is not None and tuple(arr.shape[1:]) != tuple(shape_tail)):
        want = f"({n}{''.join(', ' + str(s) for s in shape_tail)})" if shape_tail is not None else f"({n}, ...)"
        raise UserError(f"{path}: key {key!r} has shape {arr.shape}, expected {want}; the file is damaged or of "
                        "another format")
    return arr


def sequence_of(imgname: str) -> str:
    """Sequence folder of an image path ('imageFiles/downtown_walking_00/image_00012.jpg' -> 'downtown_walking_00')."""
    parts = Path(str(imgname)).parts
    return parts[-2] if len(parts) >= 2 else ""


def subset_mask(sequences, subset: str | None) -> np.ndarray:
    """3DPW test (24 sequence folders) / OCC (17 names without the trailing _NN) selection."""
    if subset is None:
        return np.ones(len(sequences), bool)
    if subset == "test":
        return np.array([s in PW3D_TEST_SEQUENCES for s in sequences], bool)
    if subset == "occ":
        return np.array([re.sub(r"_\d+$", "", s) in PW3D_OCC_SEQUENCES for s in sequences], bool)
    raise UserError(f"subset {subset!r} unknown; use 'test' or 'occ' (or none)")


def unique_ids(names) -> list:
    """'name#k' with k counting earlier rows of the same name (several people in one image)."""
    seen: dict = {}
    out = []
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(f"{name}#{k}")
    return out


def decode_str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def rodrigues(aa: np.ndarray) -> np.ndarray:
    """(N,3) axis-angle -> (N,3,3) rotation matrices."""
    from scipy.spatial.transform import Rotation
    return Rotation.from_rotvec(np.asarray(aa, np.float64).reshape(-1, 3)).as_matrix()


def rotmat_to_aa(rot: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    return Rotation.from_matrix(np.asarray(rot, np.float64)).as_rotvec()


# ---------------------------------------------------------------------------------------------- SPIN npz
def spin_part_to_j14(part: np.ndarray) -> np.ndarray:
    """(N,24,3) SPIN 2D joints -> (N,14,3) LSP-14. The 14th joint is SPIN's J24 18 (H36M head, matching the
    predicted LSP-14); where that is unlabelled the LSP top of head (J24 13) stands in."""
    j14 = part[:, J24_TO_J14].astype(np.float64).copy()
    head_missing = ~(j14[:, 13, 2] > 0)
    j14[head_missing, 13] = part[head_missing, J24_HEAD_TOP_LSP]
    return j14


def read_spin_npz(path, image_root=None, subset: str | None = None, gt3d: str = "auto",
                  pelvis: str = "h36m-root", bbox_factor: float | None = None) -> tuple[Records, dict]:
    """Read a SPIN/PARE npz. Returns (records, info) where info describes the choices made.

    image_root: folder the ``imgname`` entries are relative to (default: the npz's folder).
    subset: None | 'test' | 'occ' (3DPW sequence lists of REFERENCE.md 4, on the imgname's folder).
    gt3d: 'auto' (SMPL pose/shape where has_smpl, else S) | 'smpl' | 'S'.
    pelvis: for S, 'h36m-root' = SPIN J24 joint 14, 'mid-hip' = mean of J24 joints 2 and 3.
    bbox_factor: multiply the stored scale (None = use it as stored, the file's boxes are final).
    """
    path = Path(path)
    data = load_npz(path)
    require(data, ["imgname", "center", "scale"], path, "SPIN/PARE npz")
    names = [decode_str(x) for x in data["imgname"]]
    n = len(names)
    image_root = Path(image_root) if image_root is not None else path.parent
    center = check_rows(data["center"], n, "center", path, (2,)).astype(np.float64)
    scale = check_rows(data["scale"], n, "scale", path).astype(np.float64).reshape(n)
    if bbox_factor is not None:
        scale = scale * float(bbox_factor)
    if gt3d not in ("auto", "smpl", "S"):
        raise UserError(f"gt3d={gt3d!r} unknown; use 'auto', 'smpl' or 'S'")
    has_pose = "pose" in data and "shape" in data
    if gt3d == "smpl" and not has_pose:
        require(data, ["pose", "shape"], path, "SPIN npz with SMPL ground truth")
    if gt3d == "S":
        require(data, ["S"], path, "SPIN npz with 3D joints")

    rec = Records(sample_ids=unique_ids(names), image_paths=[str(image_root / nm) for nm in names],
                  center=center, scale=scale)
    if has_pose and gt3d != "S":
        rec.pose = check_rows(data["pose"], n, "pose", path, (72,)).astype(np.float64)
        rec.betas = check_rows(data["shape"], n, "shape", path).astype(np.float64)[:, :10]
        rec.has_smpl = (check_rows(data["has_smpl"], n, "has_smpl", path).reshape(n) > 0
                        if "has_smpl" in data else np.ones(n, bool))
        if "gender" in data:
            try:
                rec.genders = [normalize_gender(g) for g in check_rows(data["gender"], n, "gender", path)]
            except ValueError as err:
                raise UserError(f"{path}: key 'gender': {err}; use 'm', 'f' or 'n'") from None
        else:
            rec.genders = ["neutral"] * n
    if "S" in data:
        s = check_rows(data["S"], n, "S", path)
        if s.ndim != 3 or s.shape[1] < 19 or s.shape[2] < 3:
            raise UserError(f"{path}: key 'S' has shape {s.shape}, expected (N, 24, 4) SPIN 3D joints")
        rec.joints3d = s[:, J24_TO_J14, :3].astype(np.float64)
        if pelvis == "h36m-root":
            rec.joints3d_pelvis = s[:, J24_PELVIS, :3].astype(np.float64)
        else:
            rec.joints3d_pelvis = (s[:, J24_RIGHT_HIP, :3] + s[:, J24_LEFT_HIP, :3]).astype(np.float64) / 2
    if rec.pose is None and rec.joints3d is None:
        raise UserError(f"{path}: no 3D ground truth (neither 'pose'+'shape' nor 'S'); "
                        "occbench needs one of them to score a model")
    if "part" in data:
        part = check_rows(data["part"], n, "part", path)
        if part.ndim != 3 or part.shape[1] < 19 or part.shape[2] != 3:
            raise UserError(f"{path}: key 'part' has shape {part.shape}, expected (N, 24, 3)")
        rec.joints2d = spin_part_to_j14(part)
    sequences = [sequence_of(nm) for nm in names]
    rec.meta["sequence"] = sequences
    if "partname" in data:  # occbench's synthetic sets: per-pixel part labels for attention supervision
        rec.meta["part_label_path"] = [str(image_root / decode_str(x)) for x in data["partname"]]
    info = {"format": "spin-npz", "subset": subset, "gt3d": ("smpl" if rec.pose is not None else "S"),
            "bbox_factor": bbox_factor if bbox_factor is not None else "as stored",
            "joints2d_source": "part[J24_TO_J14] (head: J24 18, else 13)" if "part" in data else "none"}
    if subset is not None:
        keep = subset_mask(sequences, subset)
        if not keep.any():
            raise UserError(f"{path}: no sample belongs to the 3DPW {subset!r} subset (sequence folders in "
                            "imgname did not match the lists of REFERENCE.md 4); is this a 3DPW file?")
        rec = rec.select(keep)
    return rec, info


# ---------------------------------------------------------------------------------------------- 3DPW pkl
def _load_pkl(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = safe_pickle.load(handle, where=str(path), holds="numpy arrays, lists and strings (a 3DPW "
                                                                  "sequence file)")
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError, ImportError) as err:
        raise UserError(f"{path}: cannot read this 3DPW sequence file ({type(err).__name__}: {err}); it is "
                        "truncated or not a 3DPW pickle -- download sequenceFiles.zip again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a 3DPW sequence file (holds a {type(data).__name__}, expected a dict)")
    return data


def read_3dpw_sequences(root, split: str = "test", subset: str | None = None,
                        bbox_factor: float = DEFAULT_BBOX_FACTOR, image_root=None) -> tuple[Records, dict]:
    """Official 3DPW: one record per (frame, person) with campose_valid.

    root: folder holding sequenceFiles/ and imageFiles/. split: 'test' | 'validation' | 'train' | 'all'.
    subset 'occ' keeps the 3DPW-OCC sequences (of all splits when split='all'), 'test' the 24 test folders.
    The box is the 2D keypoint box (poses2d, 18 COCO joints, confidence > 0) enlarged ``bbox_factor`` (SPIN).
    Global orientation is turned into the camera frame with cam_poses (SPIN); GT 2D LSP-14 are the camera
    projections of the GT 3D joints (cam_intrinsics).
    """
    root = Path(root)
    image_root = Path(image_root) if image_root is not None else root
    splits = ["train", "validation", "test"] if split == "all" else [split]
    files = []
    for sp in splits:
        folder = root / "sequenceFiles" / sp
        if not folder.is_dir():
            raise UserError(f"{folder}: folder missing; unpack 3DPW's sequenceFiles.zip into {root}")
        files += sorted(folder.glob("*.pkl"))
    if not files:
        raise UserError(f"{root / 'sequenceFiles'}: no .pkl sequence files for split {split!r}")
    cols = {k: [] for k in ("ids", "paths", "center", "scale", "pose", "betas", "genders", "R", "t", "trans",
                            "K", "sequence")}
    for path in files:
        data = _load_pkl(path)
        require(data, ["poses", "betas", "trans", "genders", "cam_poses", "cam_intrinsics", "poses2d",
                       "campose_valid"], path, "3DPW sequence")
        seq = decode_str(data.get("sequence", path.stem))
        if subset is not None and not subset_mask([seq], subset)[0]:
            continue
        cam_poses = np.asarray(data["cam_poses"], np.float64)
        n_frames = cam_poses.shape[0]
        frame_ids = np.asarray(data.get("img_frame_ids", np.arange(n_frames)), np.int64).reshape(-1)
        if frame_ids.shape[0] != n_frames:
            frame_ids = np.arange(n_frames)
        K = np.asarray(data["cam_intrinsics"], np.float64).reshape(3, 3)
        for person, gender in enumerate(data["genders"]):
            poses = np.asarray(data["poses"][person], np.float64)
            trans = np.asarray(data["trans"][person], np.float64)
            kp2d = np.asarray(data["poses2d"][person], np.float64)  # (F,3,18)
            valid = np.asarray(data["campose_valid"][person]).astype(bool).reshape(-1)
            if not (poses.shape == (n_frames, 72) and trans.shape == (n_frames, 3) and valid.shape[0] == n_frames
                    and kp2d.shape[0] == n_frames):
                raise UserError(f"{path}: person {person}: poses {poses.shape} / trans {trans.shape} / poses2d "
                                f"{kp2d.shape} / campose_valid {valid.shape} disagree with {n_frames} cam_poses")
            betas = np.asarray(data["betas"][person], np.float64).reshape(-1)[:10]
            g = normalize_gender(gender)
            for f in np.flatnonzero(valid):
                kp = kp2d[f].T if kp2d[f].shape[0] == 3 else kp2d[f]
                try:
                    c, s = bbox_from_keypoints(kp, factor=bbox_factor)
                except ValueError:
                    c, s = np.array([np.nan, np.nan]), np.nan  # reported by the dataset as a bad sample
                R, t = cam_poses[f, :3, :3], cam_poses[f, :3, 3]
                pose = poses[f].copy()
                pose[:3] = rotmat_to_aa(R @ rodrigues(pose[:3])[0])
                name = f"imageFiles/{seq}/image_{int(frame_ids[f]):05d}.jpg"
                cols["ids"].append(f"{seq}/image_{int(frame_ids[f]):05d}.jpg#{person}")
                cols["paths"].append(str(image_root / name))
                cols["center"].append(c), cols["scale"].append(s), cols["pose"].append(pose)
                cols["betas"].append(betas), cols["genders"].append(g), cols["R"].append(R)
                cols["t"].append(t), cols["trans"].append(trans[f]), cols["K"].append(K)
                cols["sequence"].append(seq)
    if not cols["ids"]:
        raise UserError(f"{root}: no valid (frame, person) in split {split!r}"
                        + (f" subset {subset!r}" if subset else ""))
    rec = Records(sample_ids=cols["ids"], image_paths=cols["paths"], center=np.array(cols["center"]),
                  scale=np.array(cols["scale"], np.float64), pose=np.array(cols["pose"]),
                  betas=np.array(cols["betas"]), genders=cols["genders"], has_smpl=np.ones(len(cols["ids"]), bool),
                  cam_R=np.array(cols["R"]), cam_t=np.array(cols["t"]), trans=np.array(cols["trans"]),
                  cam_K=np.array(cols["K"]))
    rec.meta["sequence"] = cols["sequence"]
    info = {"format": "3dpw-sequences", "split": split, "subset": subset, "bbox_factor": bbox_factor,
            "bbox_source": "poses2d (COCO-18, conf > 0) box", "gt3d": "smpl",
            "joints2d_source": "projection of GT LSP-14 with cam_intrinsics", "files": [str(f) for f in files]}
    return rec, info


# ---------------------------------------------------------------------------------------------- HumanData
def _item(value):
    """HumanData stores dicts as 0-d object arrays."""
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
        return value.item()
    return value


def _decompress_keypoints(kp: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """HumanData may store only the masked-in keypoint columns; put them back at their 190 positions."""
    if kp.shape[1] == HUMANDATA_NUM_KEYPOINTS or mask is None:
        return kp
    cols = np.flatnonzero(np.asarray(mask) > 0)
    if cols.size != kp.shape[1]:
        raise ValueError(f"compressed keypoints have {kp.shape[1]} columns but the mask has {cols.size} ones")
    full = np.zeros((kp.shape[0], len(mask), kp.shape[2]), kp.dtype)
    full[:, cols] = kp
    return full


def humandata_to_j14(kp: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(N,190,3) HUMAN_DATA keypoints -> (N,14,3) LSP-14, each joint from its best labelled candidate."""
    n = kp.shape[0]
    conf = kp[:, :, 2] * (np.asarray(mask, np.float64)[None] if mask is not None else 1.0)
    out = np.zeros((n, 14, 3))
    for j, candidates in enumerate(HUMANDATA_TO_J14_CANDIDATES):
        filled = np.zeros(n, bool)
        for c in candidates:
            take = ~filled & (conf[:, c] > 0)
            out[take, j, :2] = kp[take, c, :2]
            out[take, j, 2] = 1.0
            filled |= take
    return out


def read_humandata(path, image_root=None, bbox_factor: float = 1.0,
                   subset: str | None = None) -> tuple[Records, dict]:
    """mmhuman3d HumanData npz (3DNBF's pw3d_test_w_kp2d_ds30_op.npz).

    image_root: folder ``image_path`` is relative to (default: the npz's folder).
    bbox_factor: multiplies bbox_xywh's longer side (1.0: mmhuman3d's converter already enlarged it 1.2x).
    The ``smpl`` dict (camera-frame global_orient, body_pose, betas) is the 3D GT; ``meta['gender']`` picks the
    gendered body model; GT 2D from keypoints2d (HUMAN_DATA convention, masks applied).
    """
    path = Path(path)
    data = load_npz(path, object_arrays=True)
    require(data, ["image_path", "bbox_xywh", "smpl"], path, "HumanData npz")
    names = [decode_str(x) for x in data["image_path"]]
    n = len(names)
    image_root = Path(image_root) if image_root is not None else path.parent
    bbox = check_rows(data["bbox_xywh"], n, "bbox_xywh", path).astype(np.float64)
    if bbox.ndim != 2 or bbox.shape[1] < 4:
        raise UserError(f"{path}: key 'bbox_xywh' has shape {bbox.shape}, expected (N, 4) or (N, 5)")
    center = bbox[:, :2] + bbox[:, 2:4] / 2
    scale = bbox_factor * bbox[:, 2:4].max(axis=1) / 200.0
    smpl = _item(data["smpl"])
    if not isinstance(smpl, dict):
        raise UserError(f"{path}: key 'smpl' is not a dict; this is not a HumanData file")
    require(smpl, ["body_pose", "global_orient", "betas"], f"{path} ['smpl']", "HumanData smpl")
    body_pose = check_rows(smpl["body_pose"], n, "smpl.body_pose", path).reshape(n, -1)[:, :69]
    orient = check_rows(smpl["global_orient"], n, "smpl.global_orient", path).reshape(n, 3)
    betas = check_rows(smpl["betas"], n, "smpl.betas", path).reshape(n, -1)[:, :10]
    if body_pose.shape[1] != 69:
        raise UserError(f"{path}: smpl.body_pose has {body_pose.shape[1]} values per sample, expected 69 (23x3)")
    meta = _item(data.get("meta", {})) or {}
    genders_raw = meta.get("gender") if isinstance(meta, dict) else None
    if genders_raw is not None:
        genders_raw = list(genders_raw)
        if len(genders_raw) != n:
            raise UserError(f"{path}: meta.gender has {len(genders_raw)} entries for {n} samples")
        try:
            genders = [normalize_gender(g) for g in genders_raw]
        except ValueError as err:
            raise UserError(f"{path}: meta.gender: {err}") from None
    else:
        genders = ["neutral"] * n
    rec = Records(sample_ids=unique_ids(names), image_paths=[str(image_root / nm) for nm in names],
                  center=center, scale=scale,
                  pose=np.concatenate([orient, body_pose], axis=1).astype(np.float64),
                  betas=betas.astype(np.float64), genders=genders, has_smpl=np.ones(n, bool))
    source = "none"
    if "keypoints2d" in data:
        mask = data.get("keypoints2d_mask")
        try:
            kp = _decompress_keypoints(check_rows(data["keypoints2d"], n, "keypoints2d", path), mask)
        except ValueError as err:
            raise UserError(f"{path}: keypoints2d: {err}") from None
        if kp.shape[1] != HUMANDATA_NUM_KEYPOINTS or kp.shape[2] < 3:
            raise UserError(f"{path}: keypoints2d has shape {kp.shape}, expected (N, 190, 3) HUMAN_DATA keypoints")
        rec.joints2d = humandata_to_j14(kp.astype(np.float64), mask)
        source = "keypoints2d (HUMAN_DATA, masked; LSP extras first)"
    sequences = [sequence_of(nm) for nm in names]
    rec.meta["sequence"] = sequences
    if subset is not None:
        rec = rec.select(subset_mask(sequences, subset))
        if len(rec) == 0:
            raise UserError(f"{path}: no sample belongs to the 3DPW {subset!r} subset")
    info = {"format": "humandata", "subset": subset, "bbox_factor": bbox_factor,
            "bbox_source": "bbox_xywh (longer side)", "gt3d": "smpl", "joints2d_source": source,
            "gender_source": "meta.gender" if genders_raw is not None else "none (neutral)"}
    return rec, info

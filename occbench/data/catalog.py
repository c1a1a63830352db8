"""Known datasets and :func:`open_dataset`.

A dataset is found from its name (``demo``, ``3dpw``, ``3dpw-occ``, ``3doh``, ``h36m-p1``, ``h36m-p2``,
``3dpw-humandata``) under ``root`` / ``$OCCBENCH_DATASETS_DIR/<folder>`` / ``~/.occbench/datasets/<folder>``,
or from a path: a SPIN-format ``.npz``, a HumanData ``.npz`` (detected by its keys), a 3DPW folder
(holding ``sequenceFiles/``) or a synthetic set folder (holding ``dataset.json``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from occbench.assets import MissingAssetError, asset_dir
from occbench.data.base import Dataset, file_provenance
from occbench.data.crop import DEFAULT_BBOX_FACTOR
from occbench.data.readers import read_3dpw_sequences, read_humandata, read_spin_npz
from occbench.errors import UserError

DEFAULT_DATASET = "demo"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str               # under OCCBENCH_DATASETS_DIR
    annotations: tuple        # candidate annotation file names (searched in root and root/<subdirs>)
    fmt: str                  # 'spin-npz' | 'humandata' | '3dpw-auto'
    subset: str | None
    gt3d: str
    what: str
    source: str


KNOWN_DATASETS = {
    "3dpw": DatasetSpec("3dpw", "3dpw", ("3dpw_all_test_with_mmpose.npz", "3dpw_test.npz"), "3dpw-auto", "test",
                        "auto", "3DPW test (24 sequences): imageFiles/ + PARE's 3dpw_all_test_with_mmpose.npz "
                        "or the official sequenceFiles/",
                        "https://virtualhumans.mpi-inf.mpg.de/3DPW/ (npz: PARE's data release)"),
    "3dpw-occ": DatasetSpec("3dpw-occ", "3dpw", ("3dpw_all_test_with_mmpose.npz",), "3dpw-auto", "occ", "auto",
                            "3DPW-OCC (17 occluded sequences): same folder as 3dpw",
                            "https://virtualhumans.mpi-inf.mpg.de/3DPW/ (npz: PARE's data release)"),
    "3doh": DatasetSpec("3doh", "3doh", ("3doh_test.npz",), "spin-npz", None, "auto",
                        "3DOH50K test: images + PARE's 3doh_test.npz",
                        "https://www.yangangwang.com (3DOH50K) and PARE's data release"),
    "h36m-p1": DatasetSpec("h36m-p1", "h36m", ("h36m_valid_protocol1.npz",), "spin-npz", None, "S",
                           "Human3.6M protocol 1: images + SPIN's h36m_valid_protocol1.npz",
                           "http://vision.imar.ro/human3.6m and SPIN's fetch_data.sh"),
    "h36m-p2": DatasetSpec("h36m-p2", "h36m", ("h36m_valid_protocol2.npz",), "spin-npz", None, "S",
                           "Human3.6M protocol 2: images + SPIN's h36m_valid_protocol2.npz",
                           "http://vision.imar.ro/human3.6m and SPIN's fetch_data.sh"),
    "3dpw-humandata": DatasetSpec("3dpw-humandata", "3dpw", ("pw3d_test_w_kp2d_ds30_op.npz", "pw3d_test.npz"),
                                  "humandata", None, "smpl",
                                  "3DPW test every 30th frame as 3DNBF ships it (mmhuman3d HumanData)",
                                  "https://virtualhumans.mpi-inf.mpg.de/3DPW/ and 3DNBF's data release"),
}
ANNOTATION_SUBDIRS = ("", "dataset_extras", "preprocessed_datasets", "annotations")


def dataset_root(spec: DatasetSpec, root=None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    return asset_dir("OCCBENCH_DATASETS_DIR") / spec.folder


def find_annotation(spec: DatasetSpec, root: Path):
    for sub in ANNOTATION_SUBDIRS:
        for name in spec.annotations:
            if (root / sub / name).is_file():
                return root / sub / name
    return None


def dataset_status(name: str, root=None) -> dict:
    """Where a known dataset is expected and whether it is there (for `occbench datasets list`)."""
    if name == "demo":
        from occbench.data.synthetic import demo_dir
        folder = demo_dir()
        return {"name": name, "root": str(folder), "found": (folder / "dataset.json").is_file(),
                "what": "synthetic stand-in demo set (32 samples, the default dataset)",
                "source": "occbench itself: generated on first use or by `occbench datasets make-demo`"}
    spec = KNOWN_DATASETS[name]
    folder = dataset_root(spec, root)
    ann = find_annotation(spec, folder)
    found = ann is not None or (spec.fmt == "3dpw-auto" and (folder / "sequenceFiles").is_dir())
    return {"name": name, "root": str(folder), "found": bool(found), "annotation": str(ann) if ann else None,
            "what": spec.what, "source": spec.source}


def known_dataset_names() -> list:
    return ["demo"] + list(KNOWN_DATASETS)


def open_dataset(name_or_path=DEFAULT_DATASET, root=None, **options) -> Dataset:
    """Open a dataset by name or path -> :class:`Dataset`.

    options: pelvis ('h36m-root' | 'mid-hip'), gendered (bool, default True: 3DPW GT with the male/female
    body), smpl_dir, data_dir (body-model files), image_root, annotations (explicit annotation file),
    subset ('test' | 'occ' | None), bbox_factor, format ('spin-npz' | 'humandata' | '3dpw-sequences'),
    split (3DPW sequences), gt_chunk, device, limit (first N samples, for quick runs).
    """
    name = str(name_or_path if name_or_path is not None else DEFAULT_DATASET)
    limit = options.pop("limit", None)
    if name == "demo":
        from occbench.data.synthetic import ensure_demo
        folder = ensure_demo()
        ds = _open_synthetic(folder, "demo", options)
    elif name in KNOWN_DATASETS:
        ds = _open_known(KNOWN_DATASETS[name], root, options)
    elif os.path.exists(name):
        ds = _open_path(Path(name), options)
    else:
        raise UserError(f"dataset {name!r} is neither a known name ({', '.join(known_dataset_names())}) nor an "
                        "existing path")
    if limit is not None:
        ds = _limited(ds, int(limit))
    return ds


def _limited(ds: Dataset, limit: int) -> Dataset:
    keep = list(range(min(limit, len(ds))))
    records = ds.records.select(keep)
    out = Dataset(ds.name, records, conventions=ds.conventions, provenance=dict(ds.provenance, limit=limit),
                  pelvis=ds.pelvis, gendered=ds.gendered, smpl_dir=ds._smpl_dir, data_dir=ds._data_dir,
                  crop_size=ds.crop_size, gt_chunk=ds.gt_chunk, device=ds.device)
    out._bodies = ds._bodies
    return out


_DATASET_KW = ("pelvis", "gendered", "smpl_dir", "data_dir", "crop_size", "gt_chunk", "device")
_KNOWN_OPTIONS = set(_DATASET_KW) | {"image_root", "annotations", "subset", "bbox_factor", "format", "split",
                                     "gt3d"}


def _split_options(options: dict):
    unknown = set(options) - _KNOWN_OPTIONS
    if unknown:
        raise UserError(f"unknown dataset option(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(sorted(_KNOWN_OPTIONS))}")
    return {k: v for k, v in options.items() if k in _DATASET_KW and v is not None}


def _make(name, records, info, ann_files, options) -> Dataset:
    kw = _split_options(options)
    kw.setdefault("pelvis", "h36m-root")
    conventions = {"bbox_factor": info.get("bbox_factor"), "gt3d": info.get("gt3d"),
                   "joints2d_source": info.get("joints2d_source"), "subset": info.get("subset"),
                   "format": info.get("format")}
    if info.get("gt3d") == "S":
        conventions["joints3d_source"] = "S (SPIN J24 -> LSP-14 with J24 joint 18 as head), pelvis " + (
            "J24 joint 14 (H36M root)" if kw["pelvis"] == "h36m-root" else "mean of J24 joints 2, 3")
    else:
        conventions["joints3d_source"] = "SMPL mesh -> J_regressor_h36m -> H36M_TO_J14"
    provenance = {"reader": info.get("format"), "files": file_provenance(ann_files),
                  "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
                  **{k: v for k, v in info.items() if k not in ("files",)}}
    return Dataset(name, records, conventions=conventions, provenance=provenance, **kw)


def _missing(spec: DatasetSpec, root: Path) -> MissingAssetError:
    names = " or ".join(spec.annotations)
    extra = " (or the official sequenceFiles/ folder)" if spec.fmt == "3dpw-auto" else ""
    return MissingAssetError(
        f"dataset {spec.name!r}: {names}{extra} not found in {root} (nor its {', '.join(ANNOTATION_SUBDIRS[1:])}/ "
        f"subfolders); put {spec.what} there, set OCCBENCH_DATASETS_DIR (folder '{spec.folder}' inside it) or "
        f"pass root=...; get it from {spec.source}")


def _open_known(spec: DatasetSpec, root, options: dict) -> Dataset:
    root = dataset_root(spec, root)
    options = dict(options)
    fmt = options.pop("format", None)
    subset = options.pop("subset", spec.subset)
    image_root = options.pop("image_root", None) or root
    ann = options.pop("annotations", None)
    ann = Path(ann) if ann is not None else None
    bbox_factor = options.pop("bbox_factor", None)
    if ann is not None and not ann.is_file():
        raise MissingAssetError(f"dataset {spec.name!r}: annotation file {ann} not found")
    if ann is None and fmt != "3dpw-sequences":
        ann = find_annotation(spec, root)
    if spec.fmt == "3dpw-auto" and (fmt == "3dpw-sequences" or (ann is None and fmt is None)):
        if not (root / "sequenceFiles").is_dir():
            raise _missing(spec, root)
        split = options.pop("split", "all" if subset == "occ" else "test")
        records, info = read_3dpw_sequences(root, split=split, subset=subset, image_root=image_root,
                                            bbox_factor=DEFAULT_BBOX_FACTOR if bbox_factor is None else bbox_factor)
        return _make(spec.name, records, info, info["files"], options)
    if ann is None:
        raise _missing(spec, root)
    options.pop("split", None)
    if spec.fmt == "humandata" or fmt == "humandata":
        records, info = read_humandata(ann, image_root=image_root, subset=subset,
                                       bbox_factor=1.0 if bbox_factor is None else bbox_factor)
    else:
        records, info = read_spin_npz(ann, image_root=image_root, subset=subset,
                                      gt3d=options.pop("gt3d", spec.gt3d),
                                      pelvis=options.get("pelvis") or "h36m-root", bbox_factor=bbox_factor)
    return _make(spec.name, records, info, [ann], options)


def _open_path(path: Path, options: dict) -> Dataset:
    options = dict(options)
    if path.is_dir():
        if (path / "dataset.json").is_file():
            return _open_synthetic(path, path.name, options)
        if (path / "sequenceFiles").is_dir():
            return _open_known(KNOWN_DATASETS["3dpw"], path, dict(options, format="3dpw-sequences"))
        raise UserError(f"{path}: a folder that holds neither dataset.json (synthetic set) nor sequenceFiles/ "
                        "(3DPW); pass an annotation .npz instead")
    if path.suffix != ".npz":
        raise UserError(f"{path}: not an .npz annotation file; pass a SPIN/PARE or HumanData .npz, or a folder")
    fmt = options.pop("format", None)
    image_root = options.pop("image_root", None)
    subset = options.pop("subset", None)
    bbox_factor = options.pop("bbox_factor", None)
    options.pop("split", None)
    options.pop("annotations", None)
    if fmt is None:
        with_pickle = "smpl" not in _npz_keys(path)
        fmt = "spin-npz" if with_pickle else "humandata"
    if fmt == "humandata":
        records, info = read_humandata(path, image_root=image_root, subset=subset,
                                       bbox_factor=1.0 if bbox_factor is None else bbox_factor)
    elif fmt == "spin-npz":
        records, info = read_spin_npz(path, image_root=image_root, subset=subset, gt3d=options.pop("gt3d", "auto"),
                                      pelvis=options.get("pelvis") or "h36m-root", bbox_factor=bbox_factor)
    else:
        raise UserError(f"format {fmt!r} unknown for an .npz; use 'spin-npz' or 'humandata'")
    return _make(path.stem, records, info, [path], options)


def _npz_keys(path: Path) -> list:
    import zipfile
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{path}: cannot read this npz ({type(err).__name__}: {err}); the file is truncated or "
                        "not an npz -- download or generate it again") from None


def _open_synthetic(folder: Path, name: str, options: dict) -> Dataset:
    options = dict(options)
    meta_path = folder / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{meta_path}: unreadable ({err}); regenerate the set (occbench datasets make-synthetic)")
    ann = folder / meta.get("annotations", "annotations.npz")
    for key in ("format", "annotations", "split", "subset", "bbox_factor"):
        options.pop(key, None)
    image_root = options.pop("image_root", None) or folder
    # GT must come from the body the images were rendered with
    body_meta = meta.get("body_model", {})
    if body_meta.get("standin", True):
        from occbench.standin import standin_dir
        options["smpl_dir"] = standin_dir()
    elif body_meta.get("smpl_dir") and options.get("smpl_dir") is None:
        options["smpl_dir"] = body_meta["smpl_dir"]
    records, info = read_spin_npz(ann, image_root=image_root, gt3d=options.pop("gt3d", "auto"),
                                  pelvis=options.get("pelvis") or "h36m-root")
    info["synthetic"] = meta
    ds = _make(name, records, info, [ann], options)
    ds.conventions["synthetic"] = True
    ds.conventions["bbox_factor"] = meta.get("bbox_factor")
    return ds

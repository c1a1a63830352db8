"""occbench's body model: SMPL (through smplx) from the user's files, or the procedural stand-in.

    body = load_body_model()                         # neutral; stand-in unless SMPL files are found
    out = body(rotmat, betas)                        # rotmat (B, 24, 3, 3), betas (B, 10)
    out.vertices (B, 6890, 3), out.joints_smpl (B, 24, 3), out.joints_h36m (B, 17, 3), out.joints_lsp (B, 14, 3)

No translation is applied and no joint is subtracted: callers align with their own pelvis convention.

Where files come from:
- SMPL_{NEUTRAL,MALE,FEMALE}.{npz,pkl}: ``smpl_dir`` argument, else $OCCBENCH_SMPL_DIR, else ~/.occbench/smpl;
  a folder the user named must hold the file (MissingAssetError otherwise). When no folder was named and the
  default one holds no SMPL file, the stand-in (occbench/standin.py) is generated once into the cache and used,
  with a one-time warning, and ``body.is_standin`` / ``body.provenance['standin']`` say so.
- J_regressor_h36m.npy: ``data_dir`` argument, else $OCCBENCH_DATA_DIR, else ~/.occbench/data, else the SMPL
  folder. If a real SMPL model has no H36M regressor, the 17 H36M / 14 LSP joints are taken from SMPL's own 24
  joints (``SMPL24_TO_H36M``) and ``provenance['joint_regressor'] == 'smpl24-fallback'``: such numbers are not
  comparable with published ones.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from occbench.assets import ASSET_DIRS, MissingAssetError, asset_dir, sha256_of
from occbench.data.joints import H36M_TO_J14   # LSP-14 = these rows of the 17 H36M joints
from occbench.errors import UserError
from occbench.rotations import axis_angle_to_rotmat

SMPL_SOURCE = "https://smpl.is.tue.mpg.de (SMPL for Python, v1.1.0)"
# Released file names besides SMPL_<GENDER>.pkl (SMPL v1.0/v1.1 and SPIN's neutral model).
_RELEASE_NAMES = {
    "neutral": ("basicModel_neutral_lbs_10_207_0_v1.0.0.pkl", "basicmodel_neutral_lbs_10_207_0_v1.1.0.pkl"),
    "male": ("basicmodel_m_lbs_10_207_0_v1.1.0.pkl", "basicModel_m_lbs_10_207_0_v1.0.0.pkl"),
    "female": ("basicmodel_f_lbs_10_207_0_v1.1.0.pkl", "basicModel_f_lbs_10_207_0_v1.0.0.pkl"),
}
GENDERS = ("neutral", "male", "female")

# Fallback when J_regressor_h36m.npy is absent: each H36M row taken from the nearest SMPL joint, in the row
# order SPIN's J_regressor_h36m has (H36M_TO_J14 reads rows 1-3 as the left leg, 4-6 as the right leg):
# pelvis<-pelvis, hips/knees/ankles<-same, spine<-spine2, thorax<-neck, neck/nose<-head, head top<-head,
# shoulders/elbows/wrists<-same. LSP-14 is then SMPL [8,5,2,1,4,7,21,19,17,16,18,20,12,15]: LSP head top = SMPL
# head (15), ~15 cm below the real head top, so errors are NOT comparable with published tables.
SMPL24_TO_H36M = (0, 1, 4, 7, 2, 5, 8, 6, 12, 15, 15, 16, 18, 20, 17, 19, 21)

_warned_standin = False


@dataclass
class BodyOutput:
    """vertices (B, 6890, 3), joints_smpl (B, 24, 3), joints_h36m (B, 17, 3), joints_lsp (B, 14, 3); metres,
    model frame, no translation."""
    vertices: torch.Tensor
    joints_smpl: torch.Tensor
    joints_h36m: torch.Tensor
    joints_lsp: torch.Tensor


class BodyModel(nn.Module):
    """SMPL forward (smplx's linear blend skinning) plus the H36M / LSP joint regressors.

    ``forward(rotmat (B, 24, 3, 3), betas (B, 10)) -> BodyOutput``; ``forward_axis_angle(pose (B, 72), betas)``.
    Attributes: ``faces`` (13776, 3) int64 numpy, ``is_standin``, ``gender``, ``provenance`` (dict: files and
    their sha256, standin flag, joint_regressor 'h36m' or 'smpl24-fallback').
    """

    def __init__(self, smpl_arrays: dict, j_regressor_h36m: np.ndarray | None, *, gender: str = "neutral",
                 is_standin: bool = False, provenance: dict | None = None):
        super().__init__()
        import smplx
        from smplx.utils import Struct
        struct = Struct(**{key: np.asarray(value) for key, value in smpl_arrays.items()})
        # smplx prints a warning for 10-beta models on stdout; that is the normal SMPL release, so keep it quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            self.smpl = smplx.SMPLLayer(model_path="", data_struct=struct, gender=gender, num_betas=10)
        self.num_betas = self.smpl.num_betas
        self.faces = np.asarray(smpl_arrays["f"], dtype=np.int64)
        self.gender = gender
        self.is_standin = bool(is_standin)
        num_verts = np.asarray(smpl_arrays["v_template"]).shape[0]
        if j_regressor_h36m is not None:
            j_regressor_h36m = np.asarray(j_regressor_h36m, dtype=np.float32)
            if j_regressor_h36m.shape != (17, num_verts):
                raise UserError(f"J_regressor_h36m has shape {j_regressor_h36m.shape}, expected (17, {num_verts})")
            self.register_buffer("j_regressor_h36m", torch.from_numpy(j_regressor_h36m))
        else:
            self.j_regressor_h36m = None
        self.joint_regressor = "h36m" if j_regressor_h36m is not None else "smpl24-fallback"
        self.provenance = dict(provenance or {})
        self.provenance.update(standin=self.is_standin, gender=gender, joint_regressor=self.joint_regressor)
        if self.joint_regressor == "smpl24-fallback":
            self.provenance["joint_regressor_note"] = (
                "J_regressor_h36m.npy not found: H36M/LSP joints taken from SMPL's 24 joints "
                f"(SMPL24_TO_H36M={list(SMPL24_TO_H36M)}); results are not comparable with published numbers")
        if self.is_standin:
            self.provenance["standin_note"] = "stand-in body: numbers are not comparable to published results"

    @property
    def device(self) -> torch.device:
        return self.smpl.v_template.device

    def forward(self, rotmat: torch.Tensor, betas: torch.Tensor | None = None) -> BodyOutput:
        """rotmat (B, 24, 3, 3) (global orient first), betas (B, 10) or None (mean shape)."""
        if rotmat.ndim != 4 or rotmat.shape[1:] != (24, 3, 3):
            raise ValueError(f"rotmat must be (B, 24, 3, 3), got {tuple(rotmat.shape)}")
        batch = rotmat.shape[0]
        dtype = self.smpl.v_template.dtype
        rotmat = rotmat.to(dtype)
        if betas is None:
            betas = rotmat.new_zeros(batch, self.num_betas)
        betas = betas.to(dtype)
        if betas.shape != (batch, self.num_betas):
            raise ValueError(f"betas must be ({batch}, {self.num_betas}), got {tuple(betas.shape)}")
        out = self.smpl(betas=betas, global_orient=rotmat[:, :1], body_pose=rotmat[:, 1:], pose2rot=False)
        return self._regress_joints(out.vertices, out.joints[:, :24])

    def joints_from_vertices(self, vertices: torch.Tensor) -> BodyOutput:
        """Joints of a mesh given as vertices (B, num_vertices, 3) (a model that predicts vertices): SMPL's 24
        joints from its J_regressor applied to the posed vertices, H36M / LSP joints as in :meth:`forward`."""
        dtype = self.smpl.v_template.dtype
        vertices = vertices.to(dtype)
        joints_smpl = torch.einsum("jv,bvc->bjc", self.smpl.J_regressor.to(dtype), vertices)
        return self._regress_joints(vertices, joints_smpl)

    def _regress_joints(self, vertices: torch.Tensor, joints_smpl: torch.Tensor) -> BodyOutput:
        if self.j_regressor_h36m is not None:
            joints_h36m = torch.einsum("jv,bvc->bjc", self.j_regressor_h36m.to(vertices.dtype), vertices)
        else:
            joints_h36m = joints_smpl[:, list(SMPL24_TO_H36M)]
        joints_lsp = joints_h36m[:, list(H36M_TO_J14)]
        return BodyOutput(vertices=vertices, joints_smpl=joints_smpl, joints_h36m=joints_h36m,
                          joints_lsp=joints_lsp)

    def forward_axis_angle(self, pose: torch.Tensor, betas: torch.Tensor | None = None) -> BodyOutput:
        """pose (B, 72) axis-angle (global orient first, SMPL order), betas (B, 10)."""
        if pose.ndim != 2 or pose.shape[1] != 72:
            raise ValueError(f"pose must be (B, 72), got {tuple(pose.shape)}")
        rotmat = axis_angle_to_rotmat(pose.reshape(-1, 3)).reshape(pose.shape[0], 24, 3, 3)
        return self.forward(rotmat, betas)


def _smpl_file_in(folder: Path, gender: str) -> Path | None:
    stem = f"SMPL_{gender.upper()}"
    for name in (f"{stem}.npz", f"{stem}.pkl", *_RELEASE_NAMES[gender]):
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_smpl_file(smpl_dir=None, gender: str = "neutral") -> Path | None:
    """The SMPL file to load, or None when the stand-in should be used (no folder named, none found).

    A folder the user named (argument or $OCCBENCH_SMPL_DIR) must hold the file: MissingAssetError otherwise.
    """
    gender = _check_gender(gender)
    named = smpl_dir is not None or bool(os.environ.get("OCCBENCH_SMPL_DIR"))
    folder = asset_dir("OCCBENCH_SMPL_DIR", smpl_dir)
    if folder.is_file():  # a direct path to a model file
        return folder
    found = _smpl_file_in(folder, gender) if folder.is_dir() else None
    if found is None and named:
        from occbench.standin import is_standin_dir
        if folder.is_dir() and is_standin_dir(folder):
            raise MissingAssetError(f"stand-in folder {folder} lacks SMPL_{gender.upper()}.npz; "
                                    "rewrite it with `occbench body-model standin`")
        raise MissingAssetError(
            f"SMPL model: SMPL_{gender.upper()}.pkl (or .npz) not found in {folder} "
            f"(set --smpl-dir / OCCBENCH_SMPL_DIR); get it from {SMPL_SOURCE}")
    return found


def _check_gender(gender: str) -> str:
    gender = {"m": "male", "f": "female", "n": "neutral"}.get(str(gender).lower(), str(gender).lower())
    if gender not in GENDERS:
        raise UserError(f"unknown SMPL gender {gender!r}; use one of {', '.join(GENDERS)}")
    return gender


def _find_h36m_regressor(data_dir, smpl_folder: Path) -> Path | None:
    folders = [asset_dir("OCCBENCH_DATA_DIR", data_dir), smpl_folder]
    for folder in folders:
        if (folder / "J_regressor_h36m.npy").is_file():
            return folder / "J_regressor_h36m.npy"
    return None


def _warn_standin():
    global _warned_standin
    if not _warned_standin:
        _warned_standin = True
        warnings.warn("stand-in body: numbers are not comparable to published results "
                      f"(no SMPL model found; get it from {SMPL_SOURCE} and set OCCBENCH_SMPL_DIR)",
                      stacklevel=3)


@lru_cache(maxsize=16)
def _load_arrays(path: str, mtime: float) -> dict:
    from occbench.smpl_io import load_smpl_file
    return load_smpl_file(path)


def load_body_model(smpl_dir=None, data_dir=None, gender: str = "neutral", device=None) -> BodyModel:
    """Neutral / male / female SMPL (or the stand-in) as a BodyModel on ``device`` (default CPU).

    smpl_dir: folder holding SMPL_<GENDER>.pkl/.npz (or a direct file path); None -> $OCCBENCH_SMPL_DIR,
    ~/.occbench/smpl, else the cached stand-in. data_dir: folder with J_regressor_h36m.npy (None ->
    $OCCBENCH_DATA_DIR, ~/.occbench/data, then the SMPL folder).
    """
    gender = _check_gender(gender)
    smpl_file = resolve_smpl_file(smpl_dir, gender)
    from occbench.standin import is_standin_dir, standin_dir
    if smpl_file is None:
        _warn_standin()
        folder = standin_dir()
        smpl_file = folder / f"SMPL_{gender.upper()}.npz"
        regressor_file = folder / "J_regressor_h36m.npy"
        is_standin = True
    else:
        folder = smpl_file.parent
        is_standin = is_standin_dir(folder)
        # a stand-in body always pairs with its own regressor; a real one with the user's
        regressor_file = folder / "J_regressor_h36m.npy" if is_standin else _find_h36m_regressor(data_dir, folder)
        if regressor_file is not None and not regressor_file.is_file():
            regressor_file = None
        if regressor_file is None and not is_standin:
            warnings.warn(f"J_regressor_h36m.npy not found (set OCCBENCH_DATA_DIR; get it from "
                          f"{ASSET_DIRS['OCCBENCH_DATA_DIR'][2]}): H36M/LSP joints fall back to SMPL's 24 joints, "
                          "not comparable with published results", stacklevel=2)
    arrays = _load_arrays(str(smpl_file), smpl_file.stat().st_mtime)
    regressor = None
    if regressor_file is not None:
        try:
            regressor = np.load(regressor_file, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise UserError(f"{regressor_file}: not a readable .npy ({err})") from None
    files = {"smpl": str(smpl_file)}
    if regressor_file is not None:
        files["j_regressor_h36m"] = str(regressor_file)
    provenance = {"files": files, "sha256": {key: _cached_sha256(path) for key, path in files.items()}}
    if is_standin:
        provenance["standin_version"] = (folder / "STANDIN.txt").read_text().splitlines()[0]
    body = BodyModel(arrays, regressor, gender=gender, is_standin=is_standin, provenance=provenance)
    return body.to(device) if device is not None else body


def _cached_sha256(path: str) -> str:
    stat = os.stat(path)
    return _sha256_cached(path, stat.st_mtime, stat.st_size)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime: float, size: int) -> str:
    return sha256_of(path)


def mean_params_path(data_dir=None) -> Path:
    """smpl_mean_params.npz: ``data_dir``, else $OCCBENCH_DATA_DIR, else ~/.occbench/data, else the stand-in's.
    A folder the user named must hold it."""
    named = data_dir is not None or bool(os.environ.get("OCCBENCH_DATA_DIR"))
    folder = asset_dir("OCCBENCH_DATA_DIR", data_dir)
    if folder.is_file():
        return folder
    if (folder / "smpl_mean_params.npz").is_file():
        return folder / "smpl_mean_params.npz"
    if named:
        raise MissingAssetError(f"smpl_mean_params.npz not found in {folder} (set OCCBENCH_DATA_DIR); "
                                f"get it from {ASSET_DIRS['OCCBENCH_DATA_DIR'][2]}")
    from occbench.standin import standin_dir
    return standin_dir() / "smpl_mean_params.npz"


def load_mean_params(data_dir=None) -> dict:
    """SPIN's mean parameters: dict(pose=(144,) float32 6D (24 joints, global orient first), shape=(10,) float32,
    cam=(3,) float32). Which file was read: ``mean_params_path(data_dir)``."""
    path = mean_params_path(data_dir)
    try:
        with np.load(path, allow_pickle=False) as data:
            params = {key: np.asarray(data[key], dtype=np.float32).reshape(-1) for key in ("pose", "shape", "cam")}
    except KeyError as err:
        raise UserError(f"{path}: missing {err} (expected SPIN's smpl_mean_params.npz with pose, shape, cam)") \
            from None
    except (ValueError, OSError) as err:
        raise UserError(f"{path}: not a readable .npz ({err})") from None
    if params["pose"].shape != (144,) or params["shape"].shape != (10,) or params["cam"].shape != (3,):
        raise UserError(f"{path}: expected pose (144,), shape (10,), cam (3,), got "
                        f"{params['pose'].shape}, {params['shape'].shape}, {params['cam'].shape}")
    return params


def vertex_part_labels(body: BodyModel) -> np.ndarray:
    """(6890,) int64 in 0..23: the SMPL joint with the largest LBS weight for each vertex."""
    return body.smpl.lbs_weights.argmax(dim=1).cpu().numpy().astype(np.int64)

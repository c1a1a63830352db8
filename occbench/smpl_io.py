"""Read SMPL model files (.pkl as released, or .npz) into plain numpy, without chumpy.

The released SMPL .pkl files are Python-2 pickles holding chumpy ``Ch`` arrays (shapedirs, sometimes v_template,
posedirs, weights) and a scipy.sparse ``J_regressor``. chumpy does not import on current numpy, so this module
reads them with a restricted unpickler: chumpy objects and scipy sparse matrices become numpy arrays, numpy
arrays load as usual, and any other class is refused (a pickle can run code; a model file has no reason to).
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from occbench.errors import UserError
from occbench.safe_pickle import RestrictedUnpickler

# Keys smplx's SMPL reads (plus a few the releases carry that we keep when present).
REQUIRED_KEYS = ("v_template", "f", "weights", "kintree_table", "J_regressor", "shapedirs", "posedirs")
OPTIONAL_KEYS = ("J", "bs_style", "bs_type", "vert_sym_idxs", "pose_training_info")


class _StateHolder:
    """Stand-in for a class we do not import: records the pickled state to be converted after loading."""
    _module = ""
    _name = ""

    def __init__(self, *args, **kwargs):
        self._args = args
        self._state = None

    def __setstate__(self, state):
        self._state = state

    @classmethod
    def _subclass(cls, module: str, name: str):
        return type(f"{module}.{name}", (cls,), {"_module": module, "_name": name})


class _ChumpyArray(_StateHolder):
    """Any chumpy object; its value is the ``x`` in its state (``Ch.x`` holds the array)."""

    def to_numpy(self, where: str) -> np.ndarray:
        state = self._state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict):
            value = state.get("x", None)
            if isinstance(value, _ChumpyArray):
                return value.to_numpy(where)
            if value is not None:
                return np.asarray(value)
        raise UserError(f"{where}: a chumpy {self._module}.{self._name} object without an array value 'x'; "
                        "this loader reads only plain chumpy arrays (Ch), as in the released SMPL files")


class _SparseMatrix(_StateHolder):
    """A scipy.sparse matrix pickled by any scipy version: rebuilt from its state (data, indices, indptr)."""

    def to_numpy(self, where: str) -> np.ndarray:
        import scipy.sparse as sp
        state = self._state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if not isinstance(state, dict):
            raise UserError(f"{where}: unreadable scipy.sparse matrix state")
        shape = tuple(int(s) for s in state.get("_shape", state.get("shape", ())))
        fmt = self._name[:3]
        try:
            if fmt in ("csc", "csr"):
                build = sp.csc_matrix if fmt == "csc" else sp.csr_matrix
                matrix = build((state["data"], state["indices"], state["indptr"]), shape=shape)
            elif fmt == "coo":
                coords = state.get("coords") or (state["row"], state["col"])
                matrix = sp.coo_matrix((state["data"], tuple(coords)), shape=shape)
            else:
                raise KeyError(self._name)
        except KeyError as err:
            raise UserError(f"{where}: scipy.sparse {self._name} with unexpected fields ({err})") from None
        return np.asarray(matrix.toarray())


class _SmplUnpickler(RestrictedUnpickler):
    """numpy and builtins (the shared restricted unpickler) plus chumpy and scipy.sparse stand-ins."""

    def __init__(self, file, where: str):
        super().__init__(file, where, holds="numpy, chumpy and scipy.sparse arrays (an SMPL model file)")

    def resolve(self, module, name):
        if module.split(".")[0] == "chumpy":
            return _ChumpyArray._subclass(module, name)
        if module.startswith("scipy.sparse") and name.split("_")[0] in ("csc", "csr", "coo"):
            return _SparseMatrix._subclass(module, name)
        return super().resolve(module, name)


def _to_plain(value, where: str):
    if isinstance(value, (_ChumpyArray, _SparseMatrix)):
        return value.to_numpy(where)
    if isinstance(value, _StateHolder):
        raise UserError(f"{where}: unexpected object {value._module}.{value._name}")
    return value


def load_smpl_pkl(path: str | os.PathLike) -> dict:
    """Released SMPL .pkl -> dict of numpy arrays (and the few plain strings it carries). No chumpy needed."""
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as handle:
            raw = _SmplUnpickler(handle, where).load()
    except FileNotFoundError:
        raise
    except UserError:
        raise
    except Exception as err:  # truncated / not a pickle
        raise UserError(f"{where}: not a readable SMPL pickle ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a dict of SMPL arrays, found {type(raw).__name__}")
    return {key: _to_plain(value, f"{where} [{key}]") for key, value in raw.items()}


def load_smpl_npz(path: str | os.PathLike) -> dict:
    """SMPL .npz (as written by ``convert_smpl_pkl`` or the stand-in) -> dict of numpy arrays."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise UserError(f"{path}: not a readable .npz ({err})") from None


def load_smpl_file(path: str | os.PathLike) -> dict:
    """Load a .pkl or .npz SMPL model file and check it has every array smplx needs with SMPL's shapes."""
    path = Path(path)
    data = load_smpl_pkl(path) if path.suffix == ".pkl" else load_smpl_npz(path)
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise UserError(f"{path}: not an SMPL model file, missing {', '.join(missing)}")
    arrays = {key: np.asarray(data[key]) for key in REQUIRED_KEYS}
    num_verts = arrays["v_template"].shape[0]
    expected = {
        "v_template": (num_verts, 3), "weights": (num_verts, 24), "kintree_table": (2, 24),
        "J_regressor": (24, num_verts),
    }
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise UserError(f"{path}: {key} has shape {arrays[key].shape}, SMPL needs {shape}")
    if arrays["f"].ndim != 2 or arrays["f"].shape[1] != 3:
        raise UserError(f"{path}: f has shape {arrays['f'].shape}, SMPL needs (F, 3)")
    if arrays["shapedirs"].shape[:2] != (num_verts, 3) or arrays["posedirs"].shape != (num_verts, 3, 207):
        raise UserError(f"{path}: shapedirs {arrays['shapedirs'].shape} / posedirs {arrays['posedirs'].shape} "
                        f"do not match SMPL's ({num_verts}, 3, K) / ({num_verts}, 3, 207)")
    for key in OPTIONAL_KEYS:
        if key in data and isinstance(data[key], np.ndarray) and data[key].dtype != object:
            arrays[key] = data[key]
    return arrays


def convert_smpl_pkl(pkl_path: str | os.PathLike, out_npz: str | os.PathLike) -> Path:
    """Write a plain-numpy .npz copy of an SMPL .pkl (readable by numpy alone, and by occbench / smplx)."""
    arrays = load_smpl_file(pkl_path)
    arrays["f"] = arrays["f"].astype(np.int64)
    arrays["kintree_table"] = arrays["kintree_table"].astype(np.int64)
    for key in ("v_template", "weights", "J_regressor", "shapedirs", "posedirs"):
        arrays[key] = arrays[key].astype(np.float64)
    out = Path(out_npz)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    out.write_bytes(buffer.getvalue())
    return out

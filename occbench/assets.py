"""Where the user's licensed assets are, and one-line messages when they are not.

Every asset is found from, in order: an explicit argument / CLI option, an environment variable, then the
default folder under ``~/.occbench``. Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from occbench.errors import UserError

HOME = Path(os.environ.get("OCCBENCH_HOME", Path.home() / ".occbench"))

# env var -> (default folder, what goes there, where to get it)
ASSET_DIRS = {
    "OCCBENCH_SMPL_DIR": (HOME / "smpl", "SMPL_NEUTRAL/MALE/FEMALE .pkl or .npz",
                          "https://smpl.is.tue.mpg.de (SMPL for Python, v1.1.0)"),
    "OCCBENCH_DATA_DIR": (HOME / "data", "J_regressor_h36m.npy, J_regressor_extra.npy, smpl_mean_params.npz",
                          "SPIN's fetch_data.sh (https://github.com/nkolot/SPIN) or PARE's data release"),
    "OCCBENCH_CHECKPOINT_DIR": (HOME / "checkpoints", "official model checkpoints",
                                "the model's entry in `occbench models`"),
    "OCCBENCH_DATASETS_DIR": (HOME / "datasets", "3DPW, 3DOH, Human3.6M, DTD, VOC folders",
                              "each dataset's site (see README)"),
}


class MissingAssetError(UserError, FileNotFoundError):
    """A licensed asset is missing. ``str(err)`` is one line: what, where it was looked for, where to get it."""


def asset_dir(env_var: str, explicit: str | os.PathLike | None = None) -> Path:
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser()
    return ASSET_DIRS[env_var][0]


def find_checkpoint_file(filenames, checkpoint_dir=None) -> tuple[Path | None, Path]:
    """(first of ``filenames`` in the checkpoint folder, else among the weights bundled with occbench, else
    None; the checkpoint folder searched). Imports no torch: ``occbench models`` lists files quickly."""
    folder = asset_dir("OCCBENCH_CHECKPOINT_DIR", checkpoint_dir)
    bundled = Path(__file__).resolve().parent / "assets"   # weights shipped in the package (the demo model)
    for candidate in (folder, bundled):
        for name in filenames:
            if (candidate / name).is_file():
                return candidate / name, folder
    return None, folder


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where occbench keeps what it generates itself (stand-in body, demo data)."""
    path = Path(os.environ.get("OCCBENCH_CACHE_DIR", HOME / "cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path

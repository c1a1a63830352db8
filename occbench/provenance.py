"""How a run was made, beyond its parameters: package versions, the git commit and the device (run.json)."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def dataset_fingerprint(dataset) -> str:
    """Content identity of a dataset (resume refuses a different one): ``dataset.fingerprint()`` for occbench's
    datasets (annotation content), else a hash of its name and sample ids (a user's own dataset object)."""
    if hasattr(dataset, "fingerprint"):
        return dataset.fingerprint()
    import hashlib
    import json
    ids = [str(s) for s in getattr(dataset, "sample_ids", range(len(dataset)))]
    return hashlib.sha256(json.dumps([getattr(dataset, "name", None), ids]).encode()).hexdigest()[:16]


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("occbench", "torch", "numpy", "pandas", "pyarrow", "smplx", "scikit-image"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when tracked files are modified; None outside a git checkout."""
    try:
        root = Path(__file__).resolve().parent.parent
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if result.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return result.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

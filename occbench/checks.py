"""Checks of run arguments shared by the library entry points and the CLI: a bad value is a one-line UserError.

Each message names the option, the value and the valid range. Protocol fields are checked in
:mod:`occbench.protocol`; images and checkpoints where they are read.
"""
from __future__ import annotations

import math
import re

from occbench.errors import UserError

SEED_MAX = 2**32 - 1          # seeds key every random draw; numpy and torch both accept 0..2**32-1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
NAME_MAX_LENGTH = 100
DEVICE_TYPES = ("cpu", "cuda", "mps")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(seed, option: str = "--seed") -> int:
    if not _is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"{option} {seed!r}: must be an integer in 0..{SEED_MAX} (2**32-1)")
    return seed


def check_run_options(*, seed=None, batch_size=None, limit=None, max_windows=None, replay=None) -> None:
    """The run's numeric options (None = not given). ``seed`` with ``replay`` is a contradiction: a replay
    uses the replayed run's seed."""
    if replay is not None and seed is not None:
        raise UserError(f"--seed {seed!r} with --replay: a replay draws the windows of the replayed run with "
                        "that run's seed; leave out --seed")
    if seed is not None:
        check_seed(seed)
    for option, value in (("--batch-size", batch_size), ("--limit", limit)):
        if option == "--batch-size" and value == "auto":
            continue
        if value is not None and (not _is_int(value) or value < 1):
            raise UserError(f"{option} {value!r}: must be an integer >= 1 (leave it out for "
                            f"{'the device default, or auto' if option == '--batch-size' else 'every sample'})")
    if max_windows is not None and (not _is_int(max_windows) or max_windows < 0):
        raise UserError(f"--max-windows {max_windows!r}: must be an integer >= 0 (0 = the clean copy only; "
                        "leave it out for every window)")


def check_name(name, what: str = "name") -> str:
    """A name that becomes a folder name: letters, digits and ``. _ + -``, not starting with a dot or dash."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or len(name) > NAME_MAX_LENGTH:
        raise UserError(f"{what} {name!r}: use 1..{NAME_MAX_LENGTH} letters, digits and . _ + - "
                        "(starting with a letter or digit); it becomes a folder name")
    return name


def safe_folder_name(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9._+-]`` replaced by ``_`` and no leading dot, so a
    default run folder stays inside its parent whatever the dataset or model is called."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", str(text)).lstrip(".")
    return cleaned[:200] or "run"


def resolve_device(device=None):
    """``device`` (None: cuda when available, else cpu) as a torch.device that exists on this machine."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in DEVICE_TYPES:
        raise UserError(f"--device {device!r}: unknown device; valid: cpu, cuda, cuda:N, mps")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device!r}: no CUDA GPU is available here (torch {torch.__version__}); "
                            "use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise UserError(f"--device {device!r}: this machine has {count} GPU(s): cuda:0..cuda:{count - 1}")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {device!r}: Apple MPS is not available here; use --device cpu")
    return resolved


def short_repr(value, limit: int = 80) -> str:
    """repr for a one-line message: a long list is cut, with its length."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[:limit - 20] + f"... ({len(value)} items)" if hasattr(value, "__len__") else text[:limit] + "..."


def check_finite(value, name: str, origin: str) -> None:
    """A number, or each number of a list, must be finite (NaN compares false with every bound)."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise UserError(f"{origin}: field {name!r} = {short_repr(value)}: must be finite "
                            "(NaN and inf are not valid values)")

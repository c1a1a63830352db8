"""Reading official checkpoints and loading them into zoo models with a key-by-key report.

The official loaders (PARE, SPIN, DaNet, 3DNBF) all use ``strict=False``, so a file that does not fit the
code loads silently with random weights. occbench instead compares every key and shape against the model,
names each difference, and refuses to run on a mismatch unless the user passes ``--allow-partial``.

Containers (``read_state_dict`` detects them; REFERENCE.md 7 and models/manifests/README.md):

- ``lightning``: PyTorch Lightning ``.ckpt`` (PARE): ``ckpt['state_dict']`` plus trainer fields.
- ``mmcv``: mmcv/mmhuman3d ``.pth`` (3DNBF): ``ckpt['state_dict']`` plus ``ckpt['meta']``.
- ``model-dict``: ``{'model': state_dict, 'optimizer': ...}`` (SPIN, HMR-EFT, DaNet).
- ``state-dict``: any other ``{'state_dict': ...}`` file (occbench's own training output).
- ``plain``: a bare state dict.

Safety: files are read with ``torch.load(weights_only=True)``. Lightning and mmcv files also pickle
hyper-parameters and meta data (argparse/yacs/numpy objects) that this refuses. They are then read with a
*restricted* unpickler: tensors and torch's own allow-listed types load normally, every other pickled class
is replaced by an inert placeholder (no code from the file runs, and the packages that wrote it need not be
installed). Those placeholder names are listed in the report (``opaque_objects``) and logged.

The official layouts (key names, shapes and dtypes of each released checkpoint) ship in
``models/manifests/``: :func:`manifest_path` and :func:`read_manifest` read them.
"""
from __future__ import annotations

import ast
import importlib.util
import io
import logging
import os
import pickle
import re
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from occbench.assets import MissingAssetError, sha256_of
from occbench.errors import UserError
from occbench.safe_pickle import RestrictedUnpickler

log = logging.getLogger(__name__)

CONTAINERS = ("lightning", "mmcv", "model-dict", "state-dict", "plain")
_LIGHTNING_FIELDS = ("pytorch-lightning_version", "global_step", "epoch", "optimizer_states",
                     "hyper_parameters", "callbacks", "lr_schedulers")
_LIST_LIMIT = 20  # names listed per category in the one-paragraph error message


# ------------------------------------------------------------------------------ reading a file

class _Opaque:
    """Inert stand-in for a pickled object of a class occbench does not load (hyper-parameters, meta).

    Accepts whatever pickle feeds it (constructor arguments, state, items) and keeps it as plain data.
    """

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__.setdefault("_args", args)

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("_list", []).extend(values)

    def __repr__(self):
        return f"<opaque {self.qualified_name}>"


def _torch_allowed_globals() -> dict:
    """What torch itself lets ``weights_only`` loads construct (tensor rebuilders, dtypes, OrderedDict...)."""
    try:
        from torch import _weights_only_unpickler
        return dict(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # private API moved: fall back to the essentials
        allowed = {f"torch._utils.{name}": getattr(torch._utils, name)
                   for name in dir(torch._utils) if name.startswith("_rebuild_")}
        allowed.update({"collections.OrderedDict": OrderedDict, "torch.Size": torch.Size,
                        "torch.nn.parameter.Parameter": torch.nn.Parameter, "torch.device": torch.device})
        return allowed


def _restricted_pickle_module(replaced: list[str]) -> types.ModuleType:
    """A pickle-compatible module for ``torch.load(pickle_module=...)`` whose unpickler resolves only
    torch's allow-listed globals; any other global becomes an :class:`_Opaque` subclass, named in ``replaced``."""
    allowed = _torch_allowed_globals()
    placeholders: dict[str, type] = {}

    class TorchUnpickler(RestrictedUnpickler):
        """torch's allow-list; any other global becomes an inert placeholder instead of an error."""

        def resolve(self, module, name):
            full_name = f"{module}.{name}"
            if full_name in allowed:
                return allowed[full_name]
            if full_name not in placeholders:
                placeholders[full_name] = type(name, (_Opaque,), {"qualified_name": full_name})
                replaced.append(full_name)
            return placeholders[full_name]

    module = types.ModuleType("occbench_restricted_pickle")
    module.Unpickler = TorchUnpickler
    module.Pickler = pickle.Pickler
    module.UnpicklingError = pickle.UnpicklingError
    module.load = lambda file, **kwargs: TorchUnpickler(file, **kwargs).load()
    module.loads = lambda data, **kwargs: TorchUnpickler(io.BytesIO(data), **kwargs).load()
    return module


def _corrupt(path: Path, err: BaseException) -> UserError:
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return UserError(
        f"checkpoint {path} is not a readable PyTorch checkpoint ({type(err).__name__}: {detail}); the file is "
        f"probably truncated or corrupt: download it again and compare its sha256 with the source's")


def _load_object(path: Path):
    """torch.load on CPU: weights_only first, then the restricted unpickler. Returns (object, opaque names)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as err:  # extra pickled objects, or a damaged pickle: try the restricted path
        first_error = err
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError/EOFError/ValueError on bad archives
        raise _corrupt(path, err) from err
    replaced: list[str] = []
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False,
                         pickle_module=_restricted_pickle_module(replaced))
    except Exception as err:  # noqa: BLE001
        raise _corrupt(path, err) from first_error
    if replaced:
        log.info("%s: pickled objects not loaded (kept as inert placeholders): %s", path, ", ".join(replaced))
    return obj, replaced


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _unwrap(obj, path: Path):
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if "meta" in obj:
            return obj["state_dict"], "mmcv"
        if any(name in obj for name in _LIGHTNING_FIELDS):
            return obj["state_dict"], "lightning"
        return obj["state_dict"], "state-dict"
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"], "model-dict"
    if _is_tensor_dict(obj):
        return obj, "plain"
    what = (f"top-level keys {sorted(map(str, obj))[:10]}" if isinstance(obj, dict)
            else f"a pickled {type(obj).__name__}")
    raise UserError(
        f"checkpoint {path}: no state dict found ({what}); expected a Lightning .ckpt ('state_dict'), an mmcv "
        f".pth ('state_dict' + 'meta'), a {{'model': state_dict}} file or a plain state dict")


def _read(path) -> tuple[dict, str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise MissingAssetError(f"checkpoint {path} does not exist; pass the path of the downloaded file")
    obj, opaque = _load_object(path)
    state_dict, container = _unwrap(obj, path)
    return state_dict, container, opaque


def read_state_dict(path: str | os.PathLike) -> tuple[dict, str]:
    """The state dict stored in a checkpoint file and the container it came in (one of ``CONTAINERS``).

    Keys are returned as stored (prefixes such as ``model.`` are not stripped here). Raises
    MissingAssetError for a missing file and UserError naming the file for a truncated/corrupt one or one
    without a recognisable state dict.
    """
    state_dict, container, _ = _read(path)
    return state_dict, container


# --------------------------------------------------------------------------- comparing to a model

@dataclass
class CheckpointReport:
    """How a checkpoint file matches a model, key by key.

    Key names: ``missing``, ``loaded``, ``nonfinite`` and the first element of ``misshaped`` / ``mistyped`` / ``cast``
    are model keys; ``unexpected`` and ``known_unused`` are keys as stored in the file.
    misshaped: (model key, file shape, model shape); mistyped: (model key, file dtype, model dtype) where
    the kinds differ (float vs integer vs bool); cast: same-kind dtype conversions that were applied;
    nonfinite: tensors holding NaN or inf (never loaded: one NaN weight makes every prediction NaN).
    """

    path: str
    sha256: str
    container: str
    model: str
    strip_prefixes: tuple = ()
    n_file_tensors: int = 0
    n_model_tensors: int = 0
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    known_unused: list = field(default_factory=list)
    misshaped: list = field(default_factory=list)
    mistyped: list = field(default_factory=list)
    cast: list = field(default_factory=list)
    nonfinite: list = field(default_factory=list)
    opaque_objects: list = field(default_factory=list)
    allow_partial: bool = False
    applied: bool = False

    @property
    def ok(self) -> bool:
        """Every model tensor is in the file with the right shape and kind, and nothing unexplained is left."""
        return not (self.missing or self.unexpected or self.misshaped or self.mistyped or self.nonfinite)

    def counts(self) -> dict:
        return {"file_tensors": self.n_file_tensors, "model_tensors": self.n_model_tensors,
                "loaded": len(self.loaded), "missing": len(self.missing), "unexpected": len(self.unexpected),
                "known_unused": len(self.known_unused), "misshaped": len(self.misshaped),
                "mistyped": len(self.mistyped), "cast": len(self.cast), "nonfinite": len(self.nonfinite)}

    def summary(self) -> dict:
        """JSON-ready record for run.json: identity of the file, counts, and every mismatch by name."""
        return {
            "path": self.path, "sha256": self.sha256, "container": self.container, "model": self.model,
            "strip_prefixes": list(self.strip_prefixes), "ok": self.ok, "partial": not self.ok,
            "allow_partial": self.allow_partial, "applied": self.applied, "counts": self.counts(),
            "missing": list(self.missing), "unexpected": list(self.unexpected),
            "known_unused": list(self.known_unused),
            "misshaped": [[k, list(a), list(b)] for k, a, b in self.misshaped],
            "mistyped": [list(t) for t in self.mistyped], "cast": [list(t) for t in self.cast],
            "nonfinite": list(self.nonfinite),
            "opaque_objects": list(self.opaque_objects),
        }

    def mismatch_lines(self, limit: int | None = None) -> list[str]:
        """One line per mismatch (``limit`` per category, then a count of the rest)."""
        lines: list[str] = []

        def add(title, items, fmt):
            if not items:
                return
            lines.append(f"{title} ({len(items)}):")
            shown = items if limit is None else items[:limit]
            lines.extend(f"  {fmt(item)}" for item in shown)
            if len(items) > len(shown):
                lines.append(f"  ... and {len(items) - len(shown)} more")

        add("missing in the file", self.missing, str)
        add("unexpected in the file", self.unexpected, str)
        add("wrong shape", self.misshaped, lambda t: f"{t[0]}: file {tuple(t[1])} vs model {tuple(t[2])}")
        add("wrong kind of dtype", self.mistyped, lambda t: f"{t[0]}: file {t[1]} vs model {t[2]}")
        add("NaN or inf values", self.nonfinite, str)
        return lines

    def error_message(self) -> str:
        """One paragraph: what does not match (first ~20 names per category, with counts) and the fix."""
        def names(items, fmt=str):
            shown = ", ".join(fmt(i) for i in items[:_LIST_LIMIT])
            more = f" (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
            return f"[{shown}{more}]"

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} model key(s) missing in the file {names(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s) in the file {names(self.unexpected)}")
        if self.misshaped:
            parts.append(f"{len(self.misshaped)} key(s) with the wrong shape "
                         f"{names(self.misshaped, lambda t: f'{t[0]} file {tuple(t[1])} vs model {tuple(t[2])}')}")
        if self.mistyped:
            parts.append(f"{len(self.mistyped)} key(s) with the wrong dtype "
                         f"{names(self.mistyped, lambda t: f'{t[0]} file {t[1]} vs model {t[2]}')}")
        if self.nonfinite:
            parts.append(f"{len(self.nonfinite)} tensor(s) holding NaN or inf {names(self.nonfinite)} (the file "
                         "is damaged or from a diverged training run: get the released file again)")
        return (f"checkpoint {self.path} ({self.container}, prefixes stripped: "
                f"{', '.join(self.strip_prefixes) or 'none'}) does not match model {self.model!r}: "
                f"{'; '.join(parts)}; {len(self.loaded)} of {self.n_model_tensors} model tensors match. "
                f"Check that the model name and its options (e.g. backbone) fit this file; "
                f"`occbench check-checkpoint --model NAME FILE` lists every mismatch; pass --allow-partial "
                f"to load the matching tensors anyway (the results are then labelled partial).")

    def describe(self) -> str:
        """Human-readable multi-line report (the output of ``occbench check-checkpoint``)."""
        head = (f"{self.path}\n  sha256 {self.sha256}\n  container {self.container}; prefixes stripped: "
                f"{', '.join(self.strip_prefixes) or 'none'}\n"
                f"  {len(self.loaded)}/{self.n_model_tensors} model tensors matched, "
                f"{len(self.known_unused)} known-unused file tensors accepted, "
                f"{len(self.cast)} cast to the model's dtype")
        if self.opaque_objects:
            head += f"\n  pickled objects not loaded: {', '.join(self.opaque_objects)}"
        if self.ok:
            return f"OK: {self.model}\n{head}"
        return "\n".join([f"MISMATCH: {self.model}", head] + self.mismatch_lines())


def _strip(key: str, prefixes) -> tuple[str, bool]:
    for prefix in prefixes:
        if prefix and key.startswith(prefix):
            return key[len(prefix):], True
    return key, False


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def _compare(model: torch.nn.Module, path, strip_prefixes, known_unused, allow_partial):
    """Report + {model key: tensor cast to the model's dtype} for the tensors that match."""
    path = Path(path)
    file_state, container, opaque = _read(path)
    model_state = model.state_dict()
    unused_patterns = [re.compile(p) for p in known_unused]
    report = CheckpointReport(path=str(path), sha256=sha256_of(path), container=container,
                              model=getattr(model, "name", None) or type(model).__name__,
                              strip_prefixes=tuple(strip_prefixes), n_file_tensors=len(file_state),
                              n_model_tensors=len(model_state), opaque_objects=opaque,
                              allow_partial=allow_partial)

    # A stripped key and an unprefixed one can name the same model key (PARE stores SMPL under both
    # `model.smpl.` and `smpl.`): the key that carried the network prefix wins, the other is left over.
    claimed: dict[str, str] = {}
    entries = [(stored, *_strip(stored, strip_prefixes)) for stored in file_state]
    for stored, name, was_stripped in sorted(entries, key=lambda e: not e[2]):
        if name in model_state and name not in claimed:
            claimed[name] = stored
    claimed_stored = set(claimed.values())
    for stored, name, _ in entries:
        if stored in claimed_stored:
            continue
        if any(p.search(stored) or p.search(name) for p in unused_patterns):
            report.known_unused.append(stored)
        else:
            report.unexpected.append(stored)

    tensors = {}
    for name, target in model_state.items():
        if name not in claimed:
            report.missing.append(name)
            continue
        value = file_state[claimed[name]]
        if not torch.is_tensor(value):
            report.mistyped.append((name, type(value).__name__, str(target.dtype).replace("torch.", "")))
            continue
        if tuple(value.shape) != tuple(target.shape):
            report.misshaped.append((name, tuple(value.shape), tuple(target.shape)))
            continue
        if _dtype_kind(value.dtype) != _dtype_kind(target.dtype):
            report.mistyped.append((name, str(value.dtype).replace("torch.", ""),
                                    str(target.dtype).replace("torch.", "")))
            continue
        if value.dtype != target.dtype:
            report.cast.append((name, str(value.dtype).replace("torch.", ""),
                                str(target.dtype).replace("torch.", "")))
            value = value.to(target.dtype)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            report.nonfinite.append(name)
            continue
        tensors[name] = value
        report.loaded.append(name)
    return report, tensors


def check_checkpoint(model: torch.nn.Module, path, strip_prefixes=(), known_unused=()) -> CheckpointReport:
    """Compare a checkpoint with ``model`` without changing the model; never raises on a mismatch
    (only on an unreadable file). ``report.ok`` says whether :func:`load_checkpoint_into` would succeed."""
    report, _ = _compare(model, path, strip_prefixes, known_unused, allow_partial=False)
    return report


def load_checkpoint_into(model: torch.nn.Module, path, strip_prefixes=(), known_unused=(),
                         allow_partial: bool = False) -> CheckpointReport:
    """Load a checkpoint's tensors into ``model`` after checking every key, shape and dtype.

    strip_prefixes: prefixes removed from stored keys (first match), e.g. ``("model.",)`` for PARE.
    known_unused: regexes of stored keys that inference does not use (matched against the stored and the
    stripped key); they are accepted and listed as known-unused. Tensors are cast to the model's dtype.
    Strict by default: any missing, unexpected, mis-shaped or wrongly typed key raises UserError (one
    paragraph naming them and the fix) and leaves the model untouched. ``allow_partial=True`` loads the
    tensors that match and returns a report whose ``ok`` is False. A tensor holding NaN or inf is refused
    even with ``allow_partial``.
    """
    report, tensors = _compare(model, path, strip_prefixes, known_unused, allow_partial)
    if report.nonfinite or (not report.ok and not allow_partial):   # NaN weights: refused even when partial
        raise UserError(report.error_message())
    if not report.ok:
        log.warning("partial checkpoint load: %s", report.error_message())
    model.load_state_dict(tensors, strict=False)
    report.applied = True
    return report


# ----------------------------------------------------------------------------------- writing a file

def container_object(state_dict: dict, container: str = "plain", prefix: str = "") -> dict:
    """``state_dict`` (keys prefixed with ``prefix``) wrapped in one of the containers that
    :func:`read_state_dict` recognises: lightning ``{'state_dict', 'pytorch-lightning_version', ...}``,
    mmcv ``{'meta', 'state_dict'}``, model-dict ``{'model'}``, or plain (the bare dict)."""
    state = OrderedDict((prefix + key, value) for key, value in state_dict.items())
    if container == "lightning":
        return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.1.8", "state_dict": state,
                "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}
    if container == "mmcv":
        return {"meta": {"mmcv_version": "1.3.17"}, "state_dict": state}
    if container == "model-dict":
        return {"model": state}
    if container == "plain":
        return state
    raise ValueError(f"unknown container {container!r}; valid: lightning, mmcv, model-dict, plain")


def save_state_dict(state_dict: dict, path, container: str = "plain", prefix: str = "") -> Path:
    """Write ``state_dict`` in ``container`` (see :func:`container_object`) to ``path``."""
    torch.save(container_object(state_dict, container, prefix), path)
    return Path(path)


# -------------------------------------------------------------------------------- official layouts

def manifest_dir() -> Path:
    """``models/manifests/`` (installed as ``occbench/models/manifests/``)."""
    spec = importlib.util.find_spec("occbench.models")
    return Path(next(iter(spec.submodule_search_locations))) / "manifests"


def manifest_path(name: str) -> Path:
    """Path of a checkpoint layout manifest shipped with occbench (e.g. ``"spin_hmr.tsv"``)."""
    path = manifest_dir() / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in manifest_dir().glob("*.tsv")))
        raise MissingAssetError(f"manifest {name!r} is not in {manifest_dir()}; the manifests there are: {known}")
    return path


def read_manifest(tsv: str | os.PathLike) -> list[tuple[str, tuple, str]]:
    """Parse a layout manifest: one ``key<TAB>(shape tuple)<TAB>dtype`` line per tensor, in state-dict order.

    Returns [(key, shape, dtype name such as "float32")]. Raises UserError naming the file and line.
    """
    rows = []
    text = Path(tsv).read_text()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            key, shape_text, dtype = line.split("\t")
            shape = ast.literal_eval(shape_text)
            if not isinstance(shape, tuple) or not all(isinstance(n, int) for n in shape):
                raise ValueError(f"shape {shape_text!r} is not a tuple of ints")
            getattr(torch, dtype)
        except (ValueError, SyntaxError, AttributeError) as err:
            raise UserError(f"manifest {tsv} line {number}: expected key<TAB>(shape)<TAB>dtype ({err})") from err
        rows.append((key, shape, dtype))
    return rows

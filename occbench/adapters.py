"""``wrap_model``: turn any network that maps crops to SMPL parameters, vertices or joints into a model occbench runs.

The wrapped callable (a function, a bound method or an ``nn.Module``) receives normalized images
``(B, 3, S, S)``, ``S = input_size``, resized (bilinear) from occbench's 224 px canonical crop and normalized with
``normalization`` ("imagenet", None for RGB in [0, 1], or ``(mean, std)``). It returns a dict with the keys its
:class:`Outputs` declare (``Outputs.keys()``), or a tuple whose first items are those values in that order (items
after them, such as an extras dict, are ignored).

Output forms (``Outputs.form``); lengths in metres, any body-frame origin (occbench subtracts the pelvis):

- ``"smpl"``: ``rotation`` (B,24,3,3) rotation matrices, (B,24,3) axis-angle or (B,24,6) 6D (``Outputs.rotation``;
  flat (B,216)/(B,72)/(B,144) also accepted), global orientation first; ``betas`` (B,10). Posed by occbench's
  neutral body model; joints from its H36M regressor, exactly as for the zoo models.
- ``"vertices"``: ``vertices`` (B,6890,3). Joints from the H36M regressor as for the zoo; PVE is computed.
  Sensitivity meshes are drawn from the clean SMPL parameters, which such a model does not give: unavailable.
- ``"joints"``: ``joints`` (B,14,3) LSP-14 (``Outputs.joints = "lsp14"``) or (B,17,3) H36M (``"h36m17"``, SPIN's
  J_regressor_h36m order). No mesh: PVE and sensitivity meshes are unavailable (run.json and the report say why).
  With LSP-14 joints the pelvis is the midpoint of the two hips.

Cameras (``Outputs.camera``):

- ``"weak-perspective"``: ``cam`` (B,3) ``[s, tx, ty]`` for the crop, the SPIN/PARE convention of
  :mod:`occbench.camera` (focal length 5000 px, depth ``2 * 5000 / (224 s)``).
- ``"perspective"`` (CLIFF / HMR 2.0 style): ``translation`` (B,3) in metres (camera frame, added to the body-frame
  points) and a focal length ``f`` in the model's input pixels, principal point at the input centre: key
  ``focal_length`` ((B,), (B,1) or a scalar), or a fixed ``Outputs.focal_length``. It is converted to the 224 crop's
  weak-perspective camera::

      s = 2 f / (S t_z),   tx = t_x,   ty = t_y

  In 224 px the model's focal length is ``f224 = 224 f / S``; occbench then projects with 5000 px at depth
  ``t_z * 5000 / f224``, so a point at the body's depth (z = 0) lands on the pixel the model's own camera gives and
  the two differ only by the perspective effect of depth within the body (none when ``f224 = 5000``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from occbench.camera import project_to_crop
from occbench.errors import UserError
from occbench.models.base import IMAGENET_MEAN, IMAGENET_STD, Prediction, ZooModel, autocast

FORMS = ("smpl", "vertices", "joints")
ROTATIONS = {"rotmat": (3, 3), "axis-angle": (3,), "6d": (6,)}
JOINT_SETS = {"lsp14": 14, "h36m17": 17}
CAMERAS = ("weak-perspective", "perspective")
LSP_HIPS = (2, 3)
# H36M row of each LSP-14 joint (occbench.body.H36M_TO_J14), to place LSP-only predictions in an H36M array
H36M_OF_LSP = (6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10)


@dataclass(frozen=True)
class Outputs:
    """What a wrapped model returns; recorded in run.json (``model.wrapper.outputs``)."""

    form: str = "smpl"                  # "smpl" | "vertices" | "joints"
    rotation: str = "rotmat"            # form "smpl": "rotmat" | "axis-angle" | "6d"
    joints: str = "h36m17"              # form "joints": "lsp14" | "h36m17"
    camera: str = "weak-perspective"    # "weak-perspective" | "perspective"
    focal_length: float | None = None   # "perspective": fixed focal length in input pixels (else key focal_length)

    def __post_init__(self):
        for field, valid in (("form", FORMS), ("rotation", ROTATIONS), ("joints", JOINT_SETS), ("camera", CAMERAS)):
            if getattr(self, field) not in valid:
                raise UserError(f"Outputs({field}={getattr(self, field)!r}): valid: {', '.join(valid)}")
        if self.focal_length is not None and not self.focal_length > 0:
            raise UserError(f"Outputs(focal_length={self.focal_length!r}): a focal length in input pixels, > 0")

    def keys(self) -> tuple[str, ...]:
        body = {"smpl": ("rotation", "betas"), "vertices": ("vertices",), "joints": ("joints",)}[self.form]
        if self.camera == "weak-perspective":
            return body + ("cam",)
        return body + ("translation",) + (("focal_length",) if self.focal_length is None else ())

    def describe(self) -> dict:
        """The fields that mean something for this form (what run.json records)."""
        out = {"form": self.form, "camera": self.camera, "keys": list(self.keys())}
        if self.form == "smpl":
            out["rotation"] = self.rotation
        if self.form == "joints":
            out["joints"] = self.joints
        if self.camera == "perspective":
            out["focal_length"] = self.focal_length if self.focal_length is not None else "predicted"
            out["camera_conversion"] = "s = 2 f / (input_size t_z), tx = t_x, ty = t_y (f in input pixels)"
        return out

    def unavailable(self) -> dict:
        """Mesh-dependent results this form cannot give -> the reason (shown in run.json and the report)."""
        if self.form == "joints":
            reason = "the model predicts joints only (no mesh)"
            return {"pve": reason, "sensitivity_meshes": reason}
        if self.form == "vertices":
            return {"sensitivity_meshes": "the model predicts vertices, not SMPL parameters; sensitivity meshes "
                                          "are drawn from the clean SMPL parameters"}
        return {}


def wrap_model(fn_or_module, *, name: str, input_size: int = 224, normalization="imagenet",
               outputs: Outputs | dict | None = None, body_model=None, crop_from: str = "image") -> "WrappedModel":
    """A model occbench runs (``run_protocol``, ``benchmark``, resume, report) from a callable (module docstring).

    name: the label of the runs (not a zoo model's name). body_model: occbench's neutral body model by default
    (:func:`occbench.load_body_model`); joints-only models need none. crop_from: at an input size other than
    224, "image" cuts the model's input from the source image at that size (as most pipelines crop), or
    "canonical" resizes the 224 px crop (what models trained by `occbench train` saw).
    """
    if crop_from not in ("image", "canonical"):
        raise UserError(f"wrap_model(crop_from={crop_from!r}): expected 'image' or 'canonical'")
    from occbench.models import model_names
    if not isinstance(name, str) or not name:
        raise UserError("wrap_model: give name='...', the label of the model's runs")
    if name in model_names():
        raise UserError(f"wrap_model(name={name!r}): that is a zoo model's name; choose another label")
    if not callable(fn_or_module):
        raise UserError(f"wrap_model({name!r}): expected a function or nn.Module, got {type(fn_or_module).__name__}")
    if isinstance(outputs, dict):
        unknown = set(outputs) - {f.name for f in fields(Outputs)}
        if unknown:
            raise UserError(f"wrap_model({name!r}): outputs has unknown fields {sorted(unknown)}; valid: "
                            f"{', '.join(f.name for f in fields(Outputs))}")
        outputs = Outputs(**outputs)
    outputs = outputs if outputs is not None else Outputs()
    if not isinstance(outputs, Outputs):
        raise UserError(f"wrap_model({name!r}): outputs must be occbench.adapters.Outputs(...), "
                        f"got {type(outputs).__name__}")
    if not isinstance(input_size, int) or input_size < 16:
        raise UserError(f"wrap_model({name!r}): input_size={input_size!r}, expected an int >= 16 (pixels)")
    mean_std = _normalization(name, normalization)
    cls = WrappedModel if outputs.form == "smpl" else WrappedDirectModel
    model = cls(fn_or_module, name=name, input_size=input_size, normalization=mean_std, outputs=outputs)
    model.crop_from = crop_from
    if outputs.form != "joints":
        if body_model is None:
            from occbench.body import load_body_model
            body_model = load_body_model(gender="neutral")
        model.attach_body_model(body_model)
    model.provenance = {
        "model": name, "outside_model": True, "weights": "builder", "seed": None, "options": None,
        "checkpoint": None, "checkpoint_sha256": None,
        "wrapper": {"callable": model.callable_name, "input_size": input_size,
                    "normalization": normalization if isinstance(normalization, str) or normalization is None
                    else [list(mean_std[0]), list(mean_std[1])],
                    "outputs": outputs.describe(), "crop_from": crop_from},
        "unavailable": outputs.unavailable(),
        "body_model": body_model.provenance if body_model is not None else None,
    }
    device = next(model.parameters()).device
    return model.to(device).eval()


class WrappedModel(ZooModel):
    """A wrapped callable with SMPL-parameter outputs: ``regress`` converts them, the zoo's fast path runs it."""

    def __init__(self, fn, *, name: str, input_size: int, normalization, outputs: Outputs):
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.normalization = normalization
        self.outputs = outputs
        self.__dict__["call"] = fn          # a plain attribute: registered below as `net` when it is a module
        self.callable_name = _qualified_name(fn)
        module = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(module, nn.Module):
            self.net = module               # .to(), .eval() and the device reach the wrapped network
        if next(self.parameters(), None) is None:
            # the engine reads the device off the first parameter; a plain function has none
            self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def run_info(self) -> dict:
        """What run.json records under ``model`` beyond the zoo's fields (part of the run's identity)."""
        keys = ("outside_model", "wrapper", "unavailable", "builder", "plugin")
        return {k: self.provenance[k] for k in keys if k in getattr(self, "provenance", {})}

    def preprocess(self, crops: torch.Tensor) -> torch.Tensor:
        if self.normalization is None:
            if crops.shape[-1] != self.input_size or crops.shape[-2] != self.input_size:
                crops = torch.nn.functional.interpolate(crops, size=(self.input_size, self.input_size),
                                                        mode="bilinear", align_corners=False, antialias=False)
            return crops
        return super().preprocess(crops)

    def regress(self, images: torch.Tensor):
        values = self.read_outputs(self.call(images), images.shape[0])
        return _to_rotmat(values["rotation"], self.outputs.rotation), values["betas"], self.weak_camera(values), {}

    def read_outputs(self, raw, batch: int) -> dict:
        """The callable's return value -> {key: tensor}, every shape and value checked."""
        keys = self.outputs.keys()
        where = f"wrapped model {self.name!r} ({self.callable_name})"
        if torch.is_tensor(raw) and len(keys) == 1:
            raw = (raw,)
        if isinstance(raw, dict):
            missing = [k for k in keys if k not in raw]
            if missing:
                raise UserError(f"{where}: output has no {', '.join(map(repr, missing))}; {self._expected()}")
            values = {k: raw[k] for k in keys}
        elif isinstance(raw, (tuple, list)) and len(raw) >= len(keys):
            values = dict(zip(keys, raw))
        else:
            got = f"a {len(raw)}-tuple" if isinstance(raw, (tuple, list)) else type(raw).__name__
            raise UserError(f"{where}: returned {got}; {self._expected()}")
        for key, value in values.items():
            if key == "focal_length" and isinstance(value, (int, float)):
                value = values[key] = torch.tensor(float(value))
            if not torch.is_tensor(value):
                raise UserError(f"{where}: output {key!r} is a {type(value).__name__}, expected a tensor")
            shapes = self._shapes(key, batch)
            if tuple(value.shape) not in shapes:
                raise UserError(f"{where}: output {key!r} has shape {tuple(value.shape)}, expected "
                                f"{' or '.join(str(s) for s in shapes)} (Outputs: {self.outputs.describe()})")
            if not bool(torch.isfinite(value).all()):
                raise UserError(f"{where}: output {key!r} holds NaN or inf values (batch of {batch} images)")
        return values

    def _expected(self) -> str:
        return (f"expected a dict with keys {', '.join(self.outputs.keys())} (or a tuple in that order) "
                f"for {self.outputs!r}")

    def _shapes(self, key: str, batch: int) -> list[tuple]:
        if key == "rotation":
            tail = ROTATIONS[self.outputs.rotation]
            return [(batch, 24, *tail), (batch, 24 * math.prod(tail))]
        if key == "vertices":
            return [(batch, int(self.body_model.smpl.v_template.shape[0]), 3)]
        if key == "joints":
            return [(batch, JOINT_SETS[self.outputs.joints], 3)]
        if key == "focal_length":
            return [(batch,), (batch, 1), ()]
        return [(batch, {"betas": 10, "cam": 3, "translation": 3}[key])]

    def weak_camera(self, values: dict) -> torch.Tensor:
        """(B,3) weak-perspective ``[s, tx, ty]`` of the 224 crop (the conversion in the module docstring)."""
        if self.outputs.camera == "weak-perspective":
            return values["cam"]
        translation = values["translation"]
        focal = values.get("focal_length", self.outputs.focal_length)
        focal = torch.as_tensor(focal, dtype=translation.dtype, device=translation.device).reshape(-1)
        scale = 2.0 * focal / (self.input_size * translation[:, 2])
        return torch.stack([scale.expand(translation.shape[0]), translation[:, 0], translation[:, 1]], dim=-1)


class WrappedDirectModel(WrappedModel):
    """A wrapped callable predicting vertices or joints: ``predict`` builds the Prediction without posing a body.

    rotmat and betas are NaN (the run's predictions table keeps its schema; nothing reads them for these forms).
    """

    def predict(self, crops: torch.Tensor, *, autocast_dtype: torch.dtype | None = None) -> Prediction:
        """As :meth:`ZooModel.predict`; with ``autocast_dtype`` the whole call (the wrapped callable and the
        body joints) runs under autocast."""
        with autocast(crops.device, autocast_dtype):
            return self._predict(crops)

    def _predict(self, crops: torch.Tensor) -> Prediction:
        images = self.preprocess(crops)
        batch = images.shape[0]
        values = self.read_outputs(self.call(images), batch)
        cam = self.weak_camera(values).float()
        if self.outputs.form == "vertices":
            body = self.body_model.joints_from_vertices(values["vertices"].float())
            vertices, joints_smpl, joints_h36m, joints_lsp = (body.vertices, body.joints_smpl, body.joints_h36m,
                                                              body.joints_lsp)
        else:
            joints = values["joints"].float()
            vertices = None
            joints_smpl = joints.new_full((batch, 24, 3), float("nan"))
            if self.outputs.joints == "h36m17":
                from occbench.data.joints import H36M_TO_J14
                joints_h36m, joints_lsp = joints, joints[:, list(H36M_TO_J14)]
            else:
                joints_lsp = joints
                joints_h36m = joints.new_full((batch, 17, 3), float("nan"))
                joints_h36m[:, list(H36M_OF_LSP)] = joints
                joints_h36m[:, 0] = joints[:, list(LSP_HIPS)].mean(1)   # pelvis: midpoint of the hips
        nan = float("nan")
        return Prediction(rotmat=cam.new_full((batch, 24, 3, 3), nan), betas=cam.new_full((batch, 10), nan),
                          cam=cam, vertices=vertices, joints_smpl=joints_smpl, joints_h36m=joints_h36m,
                          joints_lsp=joints_lsp, joints2d=project_to_crop(joints_lsp, cam), extras={})


def _to_rotmat(rotation: torch.Tensor, kind: str) -> torch.Tensor:
    from occbench.rotations import axis_angle_to_rotmat, rot6d_to_rotmat
    batch = rotation.shape[0]
    if kind == "rotmat":
        return rotation.reshape(batch, 24, 3, 3)
    if kind == "axis-angle":
        return axis_angle_to_rotmat(rotation.reshape(-1, 3)).reshape(batch, 24, 3, 3)
    return rot6d_to_rotmat(rotation.reshape(-1, 6)).reshape(batch, 24, 3, 3)


def _normalization(name: str, normalization) -> tuple | None:
    if normalization is None:
        return None
    if normalization == "imagenet":
        return (IMAGENET_MEAN, IMAGENET_STD)
    try:
        mean, std = (tuple(float(x) for x in part) for part in normalization)
        if len(mean) == 3 and len(std) == 3 and all(s > 0 for s in std):
            return (mean, std)
    except (TypeError, ValueError):
        pass
    raise UserError(f"wrap_model({name!r}): normalization={normalization!r}; valid: 'imagenet', None "
                    "(RGB in [0, 1]) or (mean, std), three numbers each")


def _qualified_name(fn) -> str:
    target = fn if not isinstance(fn, nn.Module) else type(fn)
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(fn, nn.Module):
        return f"{type(owner).__module__}.{type(owner).__qualname__}.{fn.__name__}"
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(fn).__name__)}"


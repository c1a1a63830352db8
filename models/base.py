"""The one interface every zoo model implements: ``predict(crops) -> Prediction``.

A zoo model is an ``nn.Module`` whose own ``state_dict()`` has exactly the official checkpoint's network
keys (after the container prefix is stripped). The SMPL body model is *not* part of that state dict: it is
taken from the user's SMPL files (or the stand-in) and attached with :meth:`ZooModel.attach_body_model`.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from occbench import losses
from occbench.camera import project_to_crop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Prediction:
    """Batched model output. Lengths in metres, body frame (root-relative pelvis not yet subtracted).

    rotmat: (B,24,3,3) SMPL rotations (global orient first)
    betas: (B,10)
    cam: (B,3) weak-perspective [s, tx, ty] for the 224 px canonical crop
    vertices: (B,6890,3)
    joints_smpl: (B,24,3)
    joints_h36m: (B,17,3)
    joints_lsp: (B,14,3)  LSP-14 order of REFERENCE.md 2
    joints2d: (B,14,2)  LSP-14 projected to 224-crop pixels
    extras: model-specific tensors (part attention maps, feature maps, ...)
    """

    rotmat: torch.Tensor
    betas: torch.Tensor
    cam: torch.Tensor
    vertices: torch.Tensor
    joints_smpl: torch.Tensor
    joints_h36m: torch.Tensor
    joints_lsp: torch.Tensor
    joints2d: torch.Tensor
    extras: dict = field(default_factory=dict)

    def detach(self) -> "Prediction":
        return Prediction(**{k: (v.detach() if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type in ``dtype``, or no autocast when dtype is None (fp32)."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


class ZooModel(nn.Module):
    """Base class of the zoo ports.

    Subclasses set ``input_size`` and implement :meth:`regress`, which maps normalized images
    (B,3,input_size,input_size) to ``(rotmat (B,24,3,3), betas (B,10), cam (B,3), extras dict)``.
    """

    name: str = "base"
    input_size: int = 224
    normalization: tuple = (IMAGENET_MEAN, IMAGENET_STD)
    joint_set: str = "lsp14"
    # Where the model's input pixels come from when input_size is not 224: "image" cuts them from the source
    # image at input_size (the official pipelines: 3DNBF crops 320 px directly); "canonical" resizes the 224 px
    # crop (bilinear), which is what models trained by `occbench train` learned on (load_model sets it).
    crop_from: str = "image"
    # True for models that use autograd inside predict (test-time fitting): callers then run predict under
    # torch.no_grad, never torch.inference_mode
    needs_grad: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["body_model"] = None  # kept out of state_dict() and named_modules()

    def save_checkpoint(self, path, **meta) -> None:
        """Write ``{'model': state_dict, 'occbench': {'model': name, **meta}}``, which ``load_model`` reads
        strictly (for the models without an official layout: BoPR, HKMR)."""
        torch.save({"model": self.state_dict(), "occbench": {"model": self.name, **meta}}, path)

    def attach_body_model(self, body_model) -> "ZooModel":
        self.__dict__["body_model"] = body_model
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.body_model is not None:
            self.body_model._apply(fn)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, crops: torch.Tensor) -> torch.Tensor:
        """RGB [0,1] (B,3,224,224) -> normalized (B,3,input_size,input_size)."""
        if crops.shape[-1] != self.input_size or crops.shape[-2] != self.input_size:
            crops = F.interpolate(crops, size=(self.input_size, self.input_size), mode="bilinear",
                                  align_corners=False, antialias=False)
        mean = crops.new_tensor(self.normalization[0]).view(1, 3, 1, 1)
        std = crops.new_tensor(self.normalization[1]).view(1, 3, 1, 1)
        return (crops - mean) / std

    def regress(self, images: torch.Tensor):
        raise NotImplementedError

    def predict(self, crops: torch.Tensor, *, autocast_dtype: torch.dtype | None = None) -> Prediction:
        """crops: RGB in [0,1], (B,3,224,224), the canonical crop. Returns a batched :class:`Prediction`.

        autocast_dtype: run the regressor under ``torch.autocast`` in this dtype (bf16 / fp16); its parameters
        are then cast back to fp32, so the body model always runs in fp32.
        """
        with autocast(crops.device, autocast_dtype):
            rotmat, betas, cam, extras = self.regress(self.preprocess(crops))
        if autocast_dtype is not None:
            rotmat, betas, cam = rotmat.float(), betas.float(), cam.float()
        return self.prediction_from_params(rotmat, betas, cam, extras)

    def training_losses(self, body, rotmat, betas, cam, extras, batch, *, weights: dict, use_part_loss: bool,
                        pelvis: str = "h36m-root") -> dict:
        """Scalar loss terms and 'total' of one training batch (:class:`occbench.train.Batch`) from the
        output of :meth:`regress`; body: the body model the GT was made with. The default is PARE Eq. 2
        (:func:`occbench.losses.pare_losses`); a model with its own paper loss overrides this method."""
        return losses.pare_losses(body, rotmat, betas, cam, extras, batch, weights, use_part_loss, pelvis)

    def prediction_from_params(self, rotmat, betas, cam, extras=None) -> Prediction:
        if self.body_model is None:
            raise RuntimeError(f"{self.name}: no body model attached; use occbench.load_model(...)")
        out = self.body_model(rotmat=rotmat, betas=betas)
        joints2d = project_to_crop(out.joints_lsp, cam)
        return Prediction(rotmat=rotmat, betas=betas, cam=cam, vertices=out.vertices,
                          joints_smpl=out.joints_smpl, joints_h36m=out.joints_h36m,
                          joints_lsp=out.joints_lsp, joints2d=joints2d, extras=extras or {})

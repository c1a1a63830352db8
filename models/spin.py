"""SPIN / HMR-EFT: the HMR regressor (ResNet-50 + iterative error feedback, 6D rotations).

Behaviour of nkolot/SPIN models/hmr.py at inference:
ResNet-50 trunk -> global average pool (B,2048) -> 3 iterations of
``x = cat(features, pose6d (144), betas (10), cam (3))`` (B,2205) -> fc1 (1024) -> dropout -> fc2 (1024)
-> dropout -> residual updates ``pose6d += decpose(x)``, ``betas += decshape(x)``, ``cam += deccam(x)``,
starting from the mean parameters (buffers ``init_pose`` / ``init_shape`` / ``init_cam`` from
smpl_mean_params.npz). The 6D vector of each joint is read as a 3x2 matrix (``x.view(-1, 3, 2)``, columns
= the two basis vectors) and completed by Gram-Schmidt: :func:`occbench.rotations.rot6d_to_rotmat`.

The state dict holds the ResNet keys at its root (``conv1``, ``layer1`` ..), then ``fc1``, ``fc2``,
``decpose``, ``decshape``, ``deccam`` and the three buffers: exactly SPIN's model_checkpoint.pt ``['model']``
(manifest spin_hmr.tsv). HMR-EFT checkpoints use the same network.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from occbench.models.backbones.resnet import BLOCKS, LAYERS, init_resnet_weights, trunk_forward, trunk_modules
from occbench.models.base import ZooModel
from occbench.rotations import rot6d_to_rotmat

NUM_JOINTS = 24
NPOSE = NUM_JOINTS * 6


def mean_param_buffers(mean_params: dict | None) -> dict[str, torch.Tensor]:
    """smpl_mean_params as (1,144), (1,10), (1,3) float32 tensors (``init_pose``, ``init_shape``, ``init_cam``).

    mean_params: dict with pose (144,) 6D, shape (10,), cam (3,); None loads
    :func:`occbench.body.load_mean_params` (SPIN's file, or the stand-in's when the user has none).
    """
    if mean_params is None:
        from occbench.body import load_mean_params
        mean_params = load_mean_params()
    sizes = {"pose": NPOSE, "shape": 10, "cam": 3}
    out = {}
    for key, size in sizes.items():
        if key not in mean_params:
            raise ValueError(f"mean_params lacks {key!r} (expected keys pose (144,), shape (10,), cam (3,))")
        value = torch.as_tensor(np.asarray(mean_params[key]), dtype=torch.float32).reshape(-1)
        if value.numel() != size:
            raise ValueError(f"mean_params[{key!r}] has {value.numel()} values, expected {size}")
        out[f"init_{key}"] = value.reshape(1, size).clone()
    return out


class HMRRegressor(ZooModel):
    """HMR with SPIN's IEF regressor. ``regress(images (B,3,S,S))`` ->
    (rotmat (B,24,3,3), betas (B,10), cam (B,3), extras {"pose6d": (B,144), "features": (B,feature_dim)})."""

    name = "spin"
    input_size = 224

    def __init__(self, mean_params: dict | None = None, num_iterations: int = 3, backbone: str = "resnet50",
                 backbone_stages: int = 4, hidden_size: int = 1024, input_size: int = 224) -> None:
        super().__init__()
        self.num_iterations = num_iterations
        self.input_size = int(input_size)
        depth = int(backbone[len("resnet"):])
        for name, module in trunk_modules(depth, num_stages=backbone_stages).items():
            self.add_module(name, module)
        feature_dim = 64 * 2 ** (backbone_stages - 1) * BLOCKS[LAYERS[depth][0]].expansion
        self.feature_dim = feature_dim
        self.fc1 = nn.Linear(feature_dim + NPOSE + 10 + 3, hidden_size)
        self.drop1 = nn.Dropout()
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.drop2 = nn.Dropout()
        self.decpose = nn.Linear(hidden_size, NPOSE)
        self.decshape = nn.Linear(hidden_size, 10)
        self.deccam = nn.Linear(hidden_size, 3)
        for name, value in mean_param_buffers(mean_params).items():
            self.register_buffer(name, value)
        init_resnet_weights(self)
        # small output layers: an untrained regressor starts at the mean parameters (SPIN's init)
        for layer in (self.decpose, self.decshape, self.deccam):
            nn.init.xavier_uniform_(layer.weight, gain=0.01)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalized -> (B,feature_dim) average-pooled features of the last stage (2048 for SPIN)."""
        return trunk_forward(self, images).mean(dim=(2, 3))

    def iterate(self, features: torch.Tensor, num_iterations: int | None = None):
        """IEF from the mean parameters. features (B,feature_dim) -> pose6d (B,144), betas (B,10), cam (B,3)."""
        batch = features.shape[0]
        pose = self.init_pose.expand(batch, -1)
        shape = self.init_shape.expand(batch, -1)
        cam = self.init_cam.expand(batch, -1)
        for _ in range(self.num_iterations if num_iterations is None else num_iterations):
            x = torch.cat([features, pose, shape, cam], dim=1)
            x = self.drop2(self.fc2(self.drop1(self.fc1(x))))
            pose = self.decpose(x) + pose
            shape = self.decshape(x) + shape
            cam = self.deccam(x) + cam
        return pose, shape, cam

    def regress(self, images: torch.Tensor):
        return self.regress_trunk(trunk_forward(self, images))

    def regress_trunk(self, trunk_out: torch.Tensor):
        """IEF on the last stage's map (B,C,h,w): what :meth:`regress` returns (used by incremental inference)."""
        features = trunk_out.mean(dim=(2, 3))
        pose6d, betas, cam = self.iterate(features)
        rotmat = rot6d_to_rotmat(pose6d.reshape(-1, 6)).reshape(features.shape[0], NUM_JOINTS, 3, 3)
        return rotmat, betas, cam, {"pose6d": pose6d, "features": features}


def build(mean_params: dict | None = None, num_iterations: int = 3, backbone: str = "resnet50",
          backbone_stages: int = 4, hidden_size: int = 1024, input_size: int = 224) -> HMRRegressor:
    """SPIN / HMR-EFT regressor with random weights (load the official file with occbench.load_model).

    num_iterations: IEF iterations at inference (3 in SPIN and EFT).
    backbone, backbone_stages, hidden_size, input_size: the official network is resnet50 / 4 / 1024 / 224;
    anything else is a small configuration with no official layout (the demo model ``spin-demo``).
    """
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, not {num_iterations}")
    if backbone not in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        raise ValueError(f"spin backbone must be resnet18/34/50/101/152, not {backbone!r}")
    if input_size % 32:
        raise ValueError(f"spin input_size must be a multiple of 32, not {input_size}")
    if hidden_size < 1:
        raise ValueError(f"spin hidden_size must be >= 1, not {hidden_size}")
    return HMRRegressor(mean_params=mean_params, num_iterations=num_iterations, backbone=backbone,
                        backbone_stages=backbone_stages, hidden_size=hidden_size, input_size=input_size)


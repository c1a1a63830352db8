"""An example occbench plugin: a tiny CNN regressing SMPL parameters, wrapped with ``occbench.wrap_model``.

Installed (``pip install examples/plugin``), it appears in ``occbench models`` as ``tiny-hmr`` and runs with
``occbench run --model tiny-hmr --protocol occsens40``. Untrained, its numbers mean nothing: it shows the plumbing.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import occbench
from occbench.adapters import Outputs


class TinyRegressor(nn.Module):
    """Two strided convolutions, global pooling, one linear layer -> axis-angle pose, betas, weak-perspective camera."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 24 * 3 + 10 + 3)
        with torch.no_grad():   # start near an upright body facing the camera, about 2/3 of the crop high
            self.head.weight.mul_(0.01)
            self.head.bias.zero_()
            self.head.bias[0] = math.pi            # global orientation: SMPL's y-up body turned to the camera
            self.head.bias[24 * 3 + 10] = 0.9      # weak-perspective scale

    def forward(self, images: torch.Tensor) -> dict:
        out = self.head(self.features(images))
        return {"rotation": out[:, :72], "betas": out[:, 72:82], "cam": out[:, 82:]}


def build(checkpoint: str | None = None):
    """Tiny HMR-style example regressor (64 px input, axis-angle pose; occbench plugin example)."""
    network = TinyRegressor()
    if checkpoint is not None:
        network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return occbench.wrap_model(network, name="tiny-hmr", input_size=64, normalization="imagenet",
                               outputs=Outputs(form="smpl", rotation="axis-angle", camera="weak-perspective"))

"""3DNBF (Zhang et al., ICCV 2023): the regressor ``3dnbf-reg`` and the full model ``3dnbf`` (regressor
initialisation + test-time fitting of Neural Body Volumes, :mod:`occbench.models.nbf_fit`).

Network of edz-o/3DNBF ``configs/3dnbf/resnet50_pare_w_coke_pw3d*.py`` (``PareHeadwCoKe`` + ``CoKeHead``);
module names equal the keys of the released mmcv checkpoint ``3dnbf_r50.pth`` (``ckpt['state_dict']``):

- ``backbone``: torchvision-layout ResNet-50; its four stages at 320 px: layer1 (B,256,80,80),
  layer2 (B,512,40,40), layer3 (B,1024,20,20), layer4 (B,2048,10,10). (``backbone.dummy_token`` in the
  checkpoint is a distributed-training workaround, listed as known-unused.)
- ``head.upsample_layers`` (UNet decoder): ``upsample0`` = DoubleConv(2048 -> 1024) on layer4; then
  ``upsample1..3`` = [bilinear x2 (align_corners=True), concat(skip, upsampled), DoubleConv(in -> mid -> out)]
  with skips layer3, layer2, layer1: (2048 -> 1024 -> 512), (1024 -> 512 -> 256), (512 -> 256 -> 256).
  DoubleConv = [3x3 conv (bias), BN, ReLU] x 2. ``out_layer``: 1x1 conv 256 -> 128, no bias: the feature
  map the Neural Body Volumes are fitted to (B,128,80,80), stride 4.
- PARE-style head on the 256-channel decoder output: ``keypoint_final_layer`` (1x1 -> 25 part maps,
  channel 0 background), ``smpl_final_layer`` (1x1 -> 64), part attention (softmax over pixels of each of
  the 24 part maps) pooling (B,256,24) pose features and (B,64,24) shape/camera features; ``pose_mlp``
  locally connected per joint (256 -> 6D, no bias), ``shape_mlp``/``cam_mlp`` linear on 1536. As in the
  released config (no iterative regression, use_mean_pose/use_mean_camshape off) the mean-parameter buffers
  ``init_pose/init_shape/init_cam`` are stored but not added. The same decoder features feed both branches.
- ``feature_bank`` (``Nearest3DMemoryManager``): buffers ``params`` (4,) = [K, T, -1, momentum],
  ``memory`` (858*3 + 2160, 128) = per-orientation kernel features in (orientation, kernel) order, then the
  clutter (background) features; ``accumulate_num`` (858,). Only the fitter uses them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from occbench.models.backbones.resnet import ResNet
from occbench.models.base import ZooModel
from occbench.models.pare import LocallyConnected2d, attention_pool, part_attention
from occbench.models.spin import mean_param_buffers
from occbench.rotations import rot6d_to_rotmat

NUM_JOINTS = 24
NUM_KERNELS = 858
NUM_ORIENT = 3
NUM_CLUTTER = 10 * 216  # num_noise * max_group of the released config
FEATURE_DIM = 128
DECODER_DIM = 256
SMPL_FEATURES = 64
INPUT_SIZE = 320


class DoubleConv(nn.Module):
    """[3x3 conv (bias), BN, ReLU] x 2; module path ``doubleconv.{0,1,3,4}`` as in the checkpoint."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.doubleconv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1), nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.doubleconv(x)


class Up(nn.Module):
    """Bilinear x2 of the coarse input, zero-pad to the skip's size, concat [skip, coarse], DoubleConv."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__()
        self.doubleconv = DoubleConv(in_channels, out_channels, mid_channels)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        coarse = F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=True)
        dy, dx = skip.shape[2] - coarse.shape[2], skip.shape[3] - coarse.shape[3]
        if dy or dx:
            coarse = F.pad(coarse, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.doubleconv(torch.cat([skip, coarse], dim=1))


class UNetDecoder(nn.Module):
    """ResNet-50 stages -> (decoder features (B,256,H/4,W/4), feature map (B,feature_dim,H/4,W/4))."""

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.upsample0 = DoubleConv(2048, 1024)
        self.upsample1 = Up(2048, 1024, 512)
        self.upsample2 = Up(1024, 512, 256)
        self.upsample3 = Up(512, 256, 256)
        self.out_layer = nn.Conv2d(256, feature_dim, kernel_size=1, bias=False)

    def forward(self, stages: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.upsample0(stages["layer4"])
        x = self.upsample1(x, stages["layer3"])
        x = self.upsample2(x, stages["layer2"])
        x = self.upsample3(x, stages["layer1"])
        return x, self.out_layer(x)


class NBFHead(nn.Module):
    """``PareHeadwCoKe``: stages -> pose6d (B,24,6), betas (B,10), cam (B,3), part maps (B,25,h,w),
    feature map (B,128,h,w)."""

    def __init__(self, mean_params: dict | None = None, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.register_buffer("temperature", torch.tensor(1.0))
        for name, value in mean_param_buffers(mean_params).items():
            self.register_buffer(name, value)
        self.upsample_layers = UNetDecoder(feature_dim)
        self.keypoint_final_layer = nn.Conv2d(DECODER_DIM, NUM_JOINTS + 1, kernel_size=1)
        self.smpl_final_layer = nn.Conv2d(DECODER_DIM, SMPL_FEATURES, kernel_size=1)
        self.shape_mlp = nn.Linear(NUM_JOINTS * SMPL_FEATURES, 10)
        self.cam_mlp = nn.Linear(NUM_JOINTS * SMPL_FEATURES, 3)
        self.pose_mlp = LocallyConnected2d(DECODER_DIM, 6, (NUM_JOINTS, 1))
        for layer in (self.shape_mlp, self.cam_mlp, self.pose_mlp):
            nn.init.xavier_uniform_(layer.weight, gain=0.01)

    def forward(self, stages: dict):
        decoder, feature_map = self.upsample_layers(stages)
        return (*self.regress_from_decoder(decoder), feature_map)

    def regress_from_decoder(self, decoder: torch.Tensor):
        """decoder (B,256,h,w) -> pose6d (B,24,6), betas (B,10), cam (B,3), part maps (B,25,h,w)."""
        part_maps = self.keypoint_final_layer(decoder)                                   # (B,25,h,w)
        attention = part_attention(part_maps)                                            # (B,24,h,w)
        pose_feats = attention_pool(decoder, attention)                                  # (B,256,24)
        shape_feats = attention_pool(self.smpl_final_layer(decoder), attention)          # (B,64,24)
        pose6d = self.pose_mlp(pose_feats.unsqueeze(-1)).squeeze(-1).transpose(1, 2)     # (B,24,6)
        flat = shape_feats.flatten(1)
        return pose6d, self.shape_mlp(flat), self.cam_mlp(flat), part_maps


class FeatureBank(nn.Module):
    """3DNBF's ``Nearest3DMemoryManager`` state: kernel features per orientation + clutter features.

    memory: (num_kernels*num_orient + num_clutter, C), rows L2-normalised in a trained bank; the first
    num_kernels*num_orient rows are ordered (orientation, kernel).
    """

    def __init__(self, num_kernels: int = NUM_KERNELS, num_orient: int = NUM_ORIENT,
                 num_clutter: int = NUM_CLUTTER, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.num_kernels, self.num_orient = num_kernels, num_orient
        # [K, T, -1, momentum] of the released config (K=1, T=0.07, momentum=0.9)
        self.register_buffer("params", torch.tensor([1.0, 0.07, -1.0, 0.9]))
        stdv = 1.0 / math.sqrt(feature_dim / 3)
        memory = torch.rand(num_kernels * num_orient + num_clutter, feature_dim) * 2 * stdv - stdv
        self.register_buffer("memory", F.normalize(memory, dim=1))
        self.register_buffer("accumulate_num", torch.zeros(num_kernels, dtype=torch.long))

    def kernel_features(self) -> torch.Tensor:
        """(num_kernels, num_orient, C) unit kernel features."""
        fg = self.memory[: self.num_kernels * self.num_orient]
        fg = fg.view(self.num_orient, self.num_kernels, -1).transpose(0, 1)
        return F.normalize(fg, dim=-1)

    def clutter_feature(self) -> torch.Tensor:
        """(C,) the clutter model: the normalised mean of the clutter rows (the official ``get_feature_banks``)."""
        return F.normalize(self.memory[self.num_kernels * self.num_orient:].mean(0), dim=0)


class NBFRegressor(ZooModel):
    """``3dnbf-reg``. ``regress(images (B,3,320,320))`` -> rotmat (B,24,3,3), betas, cam, extras with
    ``feature_map`` (B,128,80,80) and ``part_maps`` (B,25,80,80)."""

    name = "3dnbf-reg"
    input_size = INPUT_SIZE

    def __init__(self, mean_params: dict | None = None, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.input_size = input_size
        self.backbone = ResNet(50)
        self.head = NBFHead(mean_params)
        self.feature_bank = FeatureBank()

    def forward_features(self, images: torch.Tensor):
        return self.head(self.backbone.forward_stages(images))

    def regress(self, images: torch.Tensor):
        return self.regress_stages(self.backbone.forward_stages(images))

    def regress_stages(self, stages: dict):
        """The head on the backbone's stages layer1..4: what :meth:`regress` returns (used by incremental
        inference)."""
        pose6d, betas, cam, part_maps, feature_map = self.head(stages)
        rotmat = rot6d_to_rotmat(pose6d).view(pose6d.shape[0], NUM_JOINTS, 3, 3)
        return rotmat, betas, cam, {"feature_map": feature_map, "part_maps": part_maps}


def build_regressor(mean_params: dict | None = None, input_size: int = INPUT_SIZE) -> NBFRegressor:
    """``3dnbf-reg`` with random weights. input_size: crop size fed to the network (320 as released;
    a smaller multiple of 32 only for quick tests)."""
    if input_size % 32:
        raise ValueError(f"3dnbf input_size must be a multiple of 32, not {input_size}")
    return NBFRegressor(mean_params, input_size)


def build_fitter(mean_params: dict | None = None, input_size: int = INPUT_SIZE, **fit_options):
    """``3dnbf``: the regressor + Neural Body Volume fitting; ``fit_options`` are
    :class:`occbench.models.nbf_fit.FitOptions` fields (stage1_steps, stage2_steps, lr, ...)."""
    from occbench.models.nbf_fit import NBFFitter, FitOptions
    if input_size % 32:
        raise ValueError(f"3dnbf input_size must be a multiple of 32, not {input_size}")
    return NBFFitter(mean_params, input_size, FitOptions(**fit_options))

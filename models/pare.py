"""PARE: Part Attention REgressor (Kocabas et al., ICCV 2021), inference path of mkocabas/PARE.

Network (keys as in the released Lightning checkpoints after the ``model.`` prefix):

- ``backbone``: HRNet-W32 whose four branches are upsampled by ``upsample_stage_2..4`` and concatenated
  (PARE's ``hrnet_w32-conv``): (B,480,56,56) at 224 px; or ResNet-50 layer4: (B,2048,7,7).
- ``head.keypoint_deconv_layers`` (2D part branch) and ``head.smpl_deconv_layers`` (3D body branch):
  for HRNet, ``n`` x [3x3 conv (stride 1, no bias), BN, ReLU]; for ResNet, ``n`` x [4x4 transposed conv
  (stride 2, padding 1, no bias), BN, ReLU]. Head "2x128": n=2, 128 filters; "3x256": n=3, 256 filters.
- ``head.keypoint_final_layer`` (1x1 conv -> 25 part maps, channel 0 = background) and
  ``head.smpl_final_layer`` (1x1 conv -> 64 channels).
- Part attention: the background map is dropped, each of the 24 part maps is softmax-normalised over
  the H*W pixels and pools the body-branch features: pose features (B,C,24) from the deconv features,
  shape/camera features (B,64,24) from ``smpl_final_layer``'s output.
- ``head.pose_mlp``: a locally connected 1x1 layer (one C->6 linear map per joint, no bias),
  weight (1,6,C,24,1,1); ``head.shape_mlp`` / ``head.cam_mlp``: linear maps of the flattened (B,64*24)
  shape/camera features (channel-major, index c*24 + j) to betas (10) and camera [s, tx, ty] (3).
- 6D -> rotation with SPIN's convention (:func:`occbench.rotations.rot6d_to_rotmat`).

The released configuration has no iterative regression; without it the pose/shape input recipes of the
config ('feats.self_pose.shape.cam', 'feats.shape.cam') are not used (the MLP input sizes C and 1536 in
the manifests confirm this), and the buffers ``head.init_pose/init_shape/init_cam`` are stored but not
added to the predictions (``use_mean_pose``/``use_mean_camshape`` are off). ``head.temperature`` (soft-argmax
temperature) is stored and unused on the part-segmentation path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from occbench.models.backbones.hrnet import HRNet
from occbench.models.backbones.resnet import ResNet
from occbench.models.base import ZooModel
from occbench.rotations import rot6d_to_rotmat
from occbench.models.spin import mean_param_buffers

NUM_JOINTS = 24
NUM_PART_MAPS = NUM_JOINTS + 1  # 24 parts + background (channel 0)
SMPL_FEATURES = 64
BN_MOMENTUM = 0.1
HEADS = {"2x128": (2, 128), "3x256": (3, 256)}
BACKBONES = ("hrnet_w32", "resnet50", "resnet18")
# official layout file of each configuration (models/manifests)
MANIFESTS = {("hrnet_w32", "2x128"): "pare_hrnet_w32.tsv", ("resnet50", "2x128"): "pare_resnet50.tsv",
             ("resnet50", "3x256"): "pare_resnet50_3x256.tsv"}


class LocallyConnected2d(nn.Module):
    """Convolution with unshared weights per output location, no bias (PARE's per-joint pose MLP).

    x: (B, in_channels, H_in, W_in) -> (B, out_channels, H_out, W_out) with (H_out, W_out) = output_size.
    weight: (1, out_channels, in_channels, H_out, W_out, kernel_size**2), PARE's layout.
    """

    def __init__(self, in_channels: int, out_channels: int, output_size: tuple[int, int],
                 kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, output_size[0], output_size[1],
                                               kernel_size ** 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        patches = x.unfold(2, k, s).unfold(3, k, s)                   # (B, C, H, W, k, k)
        patches = patches.reshape(*patches.shape[:4], k * k)
        return torch.einsum("bchwk,ochwk->bohw", patches, self.weight[0])


def part_attention(part_maps: torch.Tensor) -> torch.Tensor:
    """(B,25,H,W) part-map logits -> (B,24,H,W) spatial attention: background dropped, each part map
    softmax-normalised over its H*W pixels (sums to 1 per part)."""
    b, _, h, w = part_maps.shape
    return F.softmax(part_maps[:, 1:].reshape(b, NUM_JOINTS, h * w), dim=-1).reshape(b, NUM_JOINTS, h, w)


def attention_pool(features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """features (B,C,H,W), attention (B,24,H,W) summing to 1 per part -> (B,C,24) per-part features."""
    return torch.einsum("bchw,bjhw->bcj", features, attention)


def _branch(num_layers: int, in_channels: int, filters: int, upsample: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        if upsample:
            conv = nn.ConvTranspose2d(in_channels, filters, kernel_size=4, stride=2, padding=1,
                                      output_padding=0, bias=False)
        else:
            conv = nn.Conv2d(in_channels, filters, kernel_size=3, stride=1, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(filters, momentum=BN_MOMENTUM), nn.ReLU(inplace=True)]
        in_channels = filters
    return nn.Sequential(*layers)


class PareHead(nn.Module):
    """features (B,C_in,h,w) -> pose6d (B,24,6), betas (B,10), cam (B,3), part maps (B,25,H,W).

    upsample: True for ResNet features (transposed convs double the resolution per layer), False for
    HRNet features (already at 56x56).
    """

    def __init__(self, in_channels: int, num_layers: int, filters: int, upsample: bool,
                 mean_params: dict | None = None, use_mean_pose: bool = False,
                 use_mean_camshape: bool = False) -> None:
        super().__init__()
        # PARE's config switches: add the init_* mean parameters to the regressed 6D pose / betas and camera
        self.use_mean_pose, self.use_mean_camshape = use_mean_pose, use_mean_camshape
        self.keypoint_deconv_layers = _branch(num_layers, in_channels, filters, upsample)
        self.smpl_deconv_layers = _branch(num_layers, in_channels, filters, upsample)
        self.keypoint_final_layer = nn.Conv2d(filters, NUM_PART_MAPS, kernel_size=1)
        self.smpl_final_layer = nn.Conv2d(filters, SMPL_FEATURES, kernel_size=1)
        self.register_buffer("temperature", torch.tensor(1.0))
        for name, value in mean_param_buffers(mean_params).items():
            self.register_buffer(name, value)
        self.shape_mlp = nn.Linear(NUM_JOINTS * SMPL_FEATURES, 10)
        self.cam_mlp = nn.Linear(NUM_JOINTS * SMPL_FEATURES, 3)
        self.pose_mlp = LocallyConnected2d(filters, 6, (NUM_JOINTS, 1))
        # small random output layers keep an untrained model's predictions near zero instead of exploding
        for layer in (self.shape_mlp, self.cam_mlp, self.pose_mlp):
            nn.init.xavier_uniform_(layer.weight, gain=0.01)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: torch.Tensor):
        part_maps = self.keypoint_final_layer(self.keypoint_deconv_layers(features))   # (B,25,H,W)
        attention = part_attention(part_maps)                                           # (B,24,H,W)
        smpl_feats = self.smpl_deconv_layers(features)                                  # (B,C,H,W)
        pose_feats = attention_pool(smpl_feats, attention)                              # (B,C,24)
        shape_feats = attention_pool(self.smpl_final_layer(smpl_feats), attention)      # (B,64,24)
        pose6d = self.pose_mlp(pose_feats.unsqueeze(-1)).squeeze(-1).transpose(1, 2)    # (B,24,6)
        flat = shape_feats.flatten(1)                                                   # (B,1536)
        betas, cam = self.shape_mlp(flat), self.cam_mlp(flat)
        if self.use_mean_pose:
            pose6d = pose6d + self.init_pose.view(1, NUM_JOINTS, 6)
        if self.use_mean_camshape:
            betas, cam = betas + self.init_shape, cam + self.init_cam
        return pose6d, betas, cam, part_maps


class PARE(ZooModel):
    """``regress(images (B,3,224,224))`` -> (rotmat (B,24,3,3), betas (B,10), cam (B,3), extras) with
    extras ``part_maps`` (B,25,H,W) part-segmentation logits (channel 0 background; H = 56 for HRNet and
    the 3x256 head, 28 for ResNet-50 with the 2x128 head; :func:`part_attention` turns them into the
    attention maps) and ``pose6d`` (B,24,6)."""

    name = "pare"
    input_size = 224

    def __init__(self, backbone: str = "hrnet_w32", head: str = "2x128", mean_params: dict | None = None,
                 input_size: int = 224, backbone_stages: int = 4, use_mean_pose: bool = False,
                 use_mean_camshape: bool = False) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"pare backbone must be one of {BACKBONES}, not {backbone!r}")
        if head not in HEADS:
            raise ValueError(f"pare head must be one of {tuple(HEADS)}, not {head!r}")
        if input_size % 32:
            raise ValueError(f"pare input_size must be a multiple of 32, not {input_size}")
        if backbone_stages != 4 and not backbone.startswith("resnet"):
            raise ValueError("pare backbone_stages < 4 exists only for ResNet backbones")
        self.backbone_name, self.head_name = backbone, head
        self.input_size = int(input_size)
        self.backbone_stages = int(backbone_stages)
        if backbone == "hrnet_w32":
            # final_layer is in the released file but unused: left out here, accepted as known-unused on load
            self.backbone = HRNet(32, output="concat_conv")
        else:
            self.backbone = ResNet(int(backbone[len("resnet"):]), num_stages=self.backbone_stages)
        num_layers, filters = HEADS[head]
        self.head = PareHead(self.backbone.out_channels, num_layers, filters,
                             upsample=backbone.startswith("resnet"), mean_params=mean_params,
                             use_mean_pose=use_mean_pose, use_mean_camshape=use_mean_camshape)

    @property
    def manifest(self) -> str | None:
        """Name of the official layout file of this configuration, or None when none exists."""
        if self.backbone_stages != 4:
            return None
        return MANIFESTS.get((self.backbone_name, self.head_name))

    def regress(self, images: torch.Tensor):
        return self.regress_features(self.backbone(images))

    def regress_features(self, features: torch.Tensor):
        """The head on backbone features: what :meth:`regress` returns (used by incremental inference)."""
        pose6d, betas, cam, part_maps = self.head(features)
        rotmat = rot6d_to_rotmat(pose6d.reshape(-1, 6)).reshape(features.shape[0], NUM_JOINTS, 3, 3)
        return rotmat, betas, cam, {"part_maps": part_maps, "pose6d": pose6d}


def build(mean_params: dict | None = None, backbone: str = "hrnet_w32", head: str = "2x128",
          input_size: int = 224, backbone_stages: int = 4, use_mean_pose: bool = False,
          use_mean_camshape: bool = False) -> PARE:
    """PARE with random weights (load the official file with occbench.load_model).

    backbone: "hrnet_w32" (the released pare_checkpoint.ckpt), "resnet50", or "resnet18" (small
    configurations trained with ``occbench train``; no official weights).
    head: "2x128" (2 deconv layers of 128 filters: the released HRNet model, and the R50 layout of
    pare_resnet50.tsv) or "3x256" (PARE's default config, used by 3DNBF's PARE baseline).
    input_size: network input (crops are resized from 224; protocol geometry scales by input_size/224).
    backbone_stages: 4, or 3 to stop a ResNet after layer3 (stride 16; a cheaper trunk).
    use_mean_pose / use_mean_camshape: PARE's config switches adding the SPIN mean parameters
    (``head.init_*`` buffers) to the regressed pose / shape and camera (off in the released models).
    occbench adds the mean 6D pose joint by joint (``init_pose.view(24, 6)``); the official code reshapes
    it as ``(6, 24)``, which mixes joints and components. No released checkpoint uses the switch, so
    only models trained with occbench are affected.
    """
    return PARE(backbone=backbone, head=head, mean_params=mean_params, input_size=input_size,
                backbone_stages=backbone_stages, use_mean_pose=use_mean_pose,
                use_mean_camshape=use_mean_camshape)

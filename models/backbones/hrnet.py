"""HRNet-W32/W48 (the pose-estimation HRNet of Sun et al.) with the official state-dict key names.

Keys: stem ``conv1``, ``bn1``, ``conv2``, ``bn2``; ``layer1`` (4 bottlenecks, 256 channels);
``transition1..3``; ``stage2`` (1 module, 2 branches), ``stage3`` (4 modules, 3 branches),
``stage4`` (3 modules, 4 branches), each module ``stageN.m.branches.b.k.*`` and
``stageN.m.fuse_layers.i.j.*``; optionally ``final_layer`` (1x1 conv on the highest-resolution branch,
present in PARE's checkpoint but unused there) and PARE's ``upsample_stage_2..4`` /
``downsample_stage_1..3`` fusion convs. Branch widths are (w, 2w, 4w, 8w) at strides 4, 8, 16, 32:
at 224 px input 56x56, 28x28, 14x14, 7x7.

Which output ``forward`` returns is chosen by ``output``:

- ``"list"``: the list of branch outputs of stage 4 (4 tensors, or 1 when ``multi_scale_output=False``).
- ``"highres"``: the highest-resolution branch (B, w, H/4, W/4) (DaNet's IUV estimator input).
- ``"concat_conv"``: PARE's ``hrnet_wXX-conv``: branches 2..4 upsampled by ``upsample_stage_*``
  (bilinear x2 with align_corners=True, 3x3 conv, BN, ReLU, repeated), concatenated with branch 1:
  (B, 15w, H/4, W/4), 480 channels at 56x56 for W32.
- ``"concat_interp"``: PARE's ``hrnet_wXX-interp``: bilinear resize (align_corners=True) + concat, same shape.
- ``"downsample_conv"`` / ``"downsample_interp"``: PARE's ``downsample=True`` variants, concatenation at
  the lowest resolution (B, 15w, H/32, W/32).
- ``"final_layer"``: ``final_layer`` applied to the highest-resolution branch (heatmaps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from occbench.models.backbones.resnet import BasicBlock, Bottleneck, make_res_layer

BN_MOMENTUM = 0.1
OUTPUTS = ("list", "highres", "concat_conv", "concat_interp", "downsample_conv", "downsample_interp",
           "final_layer")


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks followed by all-to-all fusion.

    inputs: list of num_branches tensors (B, c_i, H/2^i, W/2^i); returns the fused list (all branches, or only
    the first when ``multi_scale_output`` is False).
    """

    def __init__(self, num_branches: int, num_blocks: int, channels: list[int],
                 multi_scale_output: bool = True) -> None:
        super().__init__()
        self.num_branches = num_branches
        self.multi_scale_output = multi_scale_output
        self.branches = nn.ModuleList(
            make_res_layer(BasicBlock, c, c, num_blocks, bn_momentum=BN_MOMENTUM) for c in channels)
        self.fuse_layers = self._make_fuse_layers(channels) if num_branches > 1 else None
        self.relu = nn.ReLU(inplace=False)

    def _make_fuse_layers(self, channels: list[int]) -> nn.ModuleList:
        fuse_layers = []
        for i in range(self.num_branches if self.multi_scale_output else 1):
            row = []
            for j in range(self.num_branches):
                if j > i:  # lower resolution -> 1x1 conv, BN, nearest upsampling
                    row.append(nn.Sequential(nn.Conv2d(channels[j], channels[i], 1, 1, 0, bias=False),
                                             nn.BatchNorm2d(channels[i]),
                                             nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                elif j == i:
                    row.append(None)
                else:  # higher resolution -> (i - j) strided 3x3 convs, ReLU between them
                    steps = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        out_c = channels[i] if last else channels[j]
                        layers = [nn.Conv2d(channels[j], out_c, 3, 2, 1, bias=False), nn.BatchNorm2d(out_c)]
                        if not last:
                            layers.append(nn.ReLU(inplace=True))
                        steps.append(nn.Sequential(*layers))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(nn.ModuleList(row))
        return nn.ModuleList(fuse_layers)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        fused = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[i] if i == 0 else row[0](xs[0])
            for j in range(1, self.num_branches):
                y = y + (xs[j] if i == j else row[j](xs[j]))
            fused.append(self.relu(y))
        return fused


def _transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
    """Adapts the previous stage's branches to the next: 3x3 conv where widths differ, None where equal;
    a new branch is made from the last previous branch with strided 3x3 convs."""
    layers = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(None if c == pre[i] else nn.Sequential(
                nn.Conv2d(pre[i], c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
        else:
            steps = []
            for k in range(i + 1 - len(pre)):
                in_c = pre[-1]
                out_c = c if k == i - len(pre) else in_c
                steps.append(nn.Sequential(nn.Conv2d(in_c, out_c, 3, 2, 1, bias=False), nn.BatchNorm2d(out_c),
                                           nn.ReLU(inplace=True)))
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


def _resample_block(num_layers: int, channels: int, up: bool) -> nn.Sequential:
    """PARE's fusion convs: [Upsample x2 (bilinear, align_corners)] + 3x3 conv + BN + ReLU per step.
    Up: keys .1 (conv), .2 (BN) per step of 4 modules. Down: strided conv, keys .0 / .1 per step of 3."""
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        if up:
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
        layers += [nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1, bias=False),
                   nn.BatchNorm2d(channels, momentum=BN_MOMENTUM), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class HRNet(nn.Module):
    """HRNet backbone. ``forward(x)``: x (B,3,H,W) normalized images -> see module docstring for ``output``.

    width: 32 or 48 (any positive int works).
    output: one of OUTPUTS.
    multi_scale_output: False makes stage 4's last module fuse into the highest-resolution branch only
        (DaNet's layout: ``stage4.2.fuse_layers.0`` only); requires output "highres", "list" or "final_layer".
    final_layer_channels: number of output channels of ``final_layer`` (24 in PARE's checkpoint), or None
        to leave it out.
    """

    def __init__(self, width: int = 32, output: str = "concat_conv", multi_scale_output: bool = True,
                 final_layer_channels: int | None = None) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"HRNet output must be one of {OUTPUTS}, not {output!r}")
        if not multi_scale_output and output not in ("list", "highres", "final_layer"):
            raise ValueError(f"HRNet output {output!r} needs all four branches (multi_scale_output=True)")
        if output == "final_layer" and not final_layer_channels:
            raise ValueError("HRNet output 'final_layer' needs final_layer_channels")
        self.width = width
        self.output = output
        w = [width, 2 * width, 4 * width, 8 * width]

        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_res_layer(Bottleneck, 64, 64, 4, bn_momentum=BN_MOMENTUM)

        self.transition1 = _transition([256], w[:2])
        self.stage2 = self._make_stage(1, 2, w[:2])
        self.transition2 = _transition(w[:2], w[:3])
        self.stage3 = self._make_stage(4, 3, w[:3])
        self.transition3 = _transition(w[:3], w)
        self.stage4 = self._make_stage(3, 4, w, multi_scale_output=multi_scale_output)

        if final_layer_channels:
            self.final_layer = nn.Conv2d(w[0], final_layer_channels, kernel_size=1, stride=1, padding=0)
        if output == "concat_conv":
            self.upsample_stage_2 = _resample_block(1, w[1], up=True)
            self.upsample_stage_3 = _resample_block(2, w[2], up=True)
            self.upsample_stage_4 = _resample_block(3, w[3], up=True)
        elif output == "downsample_conv":
            self.downsample_stage_1 = _resample_block(3, w[0], up=False)
            self.downsample_stage_2 = _resample_block(2, w[1], up=False)
            self.downsample_stage_3 = _resample_block(1, w[2], up=False)
        self.out_channels = {"list": None, "highres": w[0], "final_layer": final_layer_channels}.get(
            output, sum(w))
        self._init_weights()

    @staticmethod
    def _make_stage(num_modules: int, num_branches: int, channels: list[int],
                    multi_scale_output: bool = True) -> nn.Sequential:
        return nn.Sequential(*[
            HighResolutionModule(num_branches, 4, channels,
                                 multi_scale_output=multi_scale_output or i < num_modules - 1)
            for i in range(num_modules)])

    def _init_weights(self) -> None:
        # the official random initialisation (before ImageNet/COCO weights are loaded)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B,3,H,W) -> stage-4 branch outputs [(B,w,H/4,W/4), (B,2w,H/8,W/8), (B,4w,H/16,W/16),
        (B,8w,H/32,W/32)] (only the first when multi_scale_output is False)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        xs = [x if t is None else t(x) for t in self.transition1]
        ys = self.stage2(xs)
        # new branches are made from the lowest-resolution output of the previous stage
        xs = [ys[i] if t is None else t(ys[-1]) for i, t in enumerate(self.transition2)]
        ys = self.stage3(xs)
        xs = [ys[i] if t is None else t(ys[-1]) for i, t in enumerate(self.transition3)]
        return self.stage4(xs)

    def forward(self, x: torch.Tensor):
        ys = self.forward_branches(x)
        if self.output == "list":
            return ys
        if self.output == "highres":
            return ys[0]
        if self.output == "final_layer":
            return self.final_layer(ys[0])
        if self.output == "concat_conv":
            return torch.cat([ys[0], self.upsample_stage_2(ys[1]), self.upsample_stage_3(ys[2]),
                              self.upsample_stage_4(ys[3])], 1)
        if self.output == "concat_interp":
            size = ys[0].shape[-2:]
            return torch.cat([ys[0]] + [F.interpolate(y, size=size, mode="bilinear", align_corners=True)
                                        for y in ys[1:]], 1)
        if self.output == "downsample_conv":
            return torch.cat([self.downsample_stage_1(ys[0]), self.downsample_stage_2(ys[1]),
                              self.downsample_stage_3(ys[2]), ys[3]], 1)
        size = ys[3].shape[-2:]  # downsample_interp
        return torch.cat([F.interpolate(y, size=size, mode="bilinear", align_corners=True)
                          for y in ys[:3]] + [ys[3]], 1)


def hrnet_w32(**kwargs) -> HRNet:
    return HRNet(width=32, **kwargs)


def hrnet_w48(**kwargs) -> HRNet:
    return HRNet(width=48, **kwargs)

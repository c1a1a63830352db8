"""ResNet-18/34/50/101/152 with torchvision's state-dict key names.

Keys: ``conv1``, ``bn1``, ``layer1`` .. ``layer4`` (blocks ``layerN.i.conv1/bn1/conv2/bn2[/conv3/bn3]`` and
``layerN.0.downsample.0`` (1x1 conv) / ``layerN.0.downsample.1`` (BN)), and ``fc`` only when a classifier is
asked for. This is the layout of SPIN's HMR (at the root of its state dict), PARE's ``backbone.*``, the mmcv
ResNet of 3DNBF (``style='pytorch'``) and DaNet's ResNet-18 streams.

The stride of a down-sampling bottleneck sits on its 3x3 conv (``conv2``), as in torchvision >= 0.2
("ResNet v1.5"), SPIN, PARE and mmcv's pytorch style.

Shapes at 224 px input: stem (B,64,56,56); layer1 (B,64*e,56,56); layer2 (B,128*e,28,28);
layer3 (B,256*e,14,14); layer4 (B,512*e,7,7) with e = 1 (BasicBlock) or 4 (Bottleneck).
"""
from __future__ import annotations

import math

import torch
from torch import nn

LAYERS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 conv; with ``groups`` > 1, that many independent ``in_planes -> out_planes`` convs side by side."""
    return nn.Conv2d(in_planes * groups, out_planes * groups, kernel_size=3, stride=stride, padding=1,
                     bias=False, groups=groups)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes * groups, out_planes * groups, kernel_size=1, stride=stride, bias=False,
                     groups=groups)


class BasicBlock(nn.Module):
    """Two 3x3 convs + identity. Keys: conv1, bn1, conv2, bn2[, downsample.0/.1].

    ``groups`` > 1 runs that many independent blocks side by side (DaNet's per-joint limb layer)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 bn_momentum: float = 0.1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, groups)
        self.bn1 = nn.BatchNorm2d(planes * groups, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, groups=groups)
        self.bn2 = nn.BatchNorm2d(planes * groups, momentum=bn_momentum)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 (x4 channels) + identity. Keys: conv1..3, bn1..3[, downsample.0/.1]."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_res_layer(block: type, inplanes: int, planes: int, num_blocks: int, stride: int = 1,
                   bn_momentum: float = 0.1, groups: int = 1) -> nn.Sequential:
    """A stage of ``num_blocks`` residual blocks; the first one projects with ``downsample`` if needed.
    ``groups`` > 1 (basic blocks only): that many independent stages side by side."""
    downsample = None
    out_planes = planes * block.expansion
    if stride != 1 or inplanes != out_planes:
        downsample = nn.Sequential(conv1x1(inplanes, out_planes, stride, groups),
                                   nn.BatchNorm2d(out_planes * groups, momentum=bn_momentum))
    extra = {"bn_momentum": bn_momentum, **({"groups": groups} if groups != 1 else {})}
    layers = [block(inplanes, planes, stride, downsample, **extra)]
    layers += [block(out_planes, planes, **extra) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)


def trunk_modules(depth: int = 50, num_stages: int = 4) -> dict[str, nn.Module]:
    """The named modules of a ResNet trunk in registration order: conv1, bn1, relu, maxpool, layer1..4.

    Exposed so that a network whose official state dict holds the ResNet keys at its root (SPIN's HMR)
    can register them on itself; run them with :func:`trunk_forward`. ``num_stages`` < 4 truncates the
    trunk after ``layer<num_stages>`` (a small trunk for quick CPU training; no official layout).
    """
    if depth not in LAYERS:
        raise ValueError(f"ResNet depth must be one of {sorted(LAYERS)}, not {depth}")
    if not 1 <= num_stages <= 4:
        raise ValueError(f"ResNet num_stages must be 1..4, not {num_stages}")
    kind, counts = LAYERS[depth]
    block = BLOCKS[kind]
    modules: dict[str, nn.Module] = {
        "conv1": nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
        "bn1": nn.BatchNorm2d(64),
        "relu": nn.ReLU(inplace=True),
        "maxpool": nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    }
    inplanes = 64
    for i, (name, count) in enumerate(zip(STAGE_NAMES[:num_stages], counts)):
        planes = 64 * 2 ** i
        modules[name] = make_res_layer(block, inplanes, planes, count, stride=1 if i == 0 else 2)
        inplanes = planes * block.expansion
    return modules


def init_resnet_weights(module: nn.Module) -> None:
    """He-normal (fan_out) convs and unit BatchNorms, the initialisation of torchvision and SPIN."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def trunk_forward(module: nn.Module, x: torch.Tensor, return_stages: bool = False):
    """Run the trunk registered on ``module``. x: (B,3,H,W) normalized images.

    Returns layer4 features (B,C,H/32,W/32), or with ``return_stages`` a dict with
    ``stem`` (after max-pool, stride 4) and ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32).
    A truncated trunk (``num_stages`` < 4) returns its last stage and has only the stages it built.
    """
    x = module.maxpool(module.relu(module.bn1(module.conv1(x))))
    stages = {"stem": x}
    for name in STAGE_NAMES:
        if name not in module._modules:
            break
        x = getattr(module, name)(x)
        stages[name] = x
    return stages if return_stages else x


class ResNet(nn.Module):
    """torchvision-layout ResNet. ``forward(x)`` -> layer4 features (B, 512*e, H/32, W/32).

    depth: 18, 34, 50, 101 or 152.
    num_stages: 4 (the full trunk) or fewer: stop after ``layer<num_stages>`` (output stride 2**(num_stages+1),
    ``64 * 2**(num_stages-1) * e`` channels).
    num_classes: None (no ``fc``, the layout of every occbench port) or the size of an ``fc`` classifier
    over global-average-pooled features (``forward`` then returns logits).
    """

    def __init__(self, depth: int = 50, num_classes: int | None = None, num_stages: int = 4) -> None:
        super().__init__()
        self.depth = depth
        self.num_stages = num_stages
        for name, m in trunk_modules(depth, num_stages).items():
            self.add_module(name, m)
        self.out_channels = 64 * 2 ** (num_stages - 1) * BLOCKS[LAYERS[depth][0]].expansion
        self.fc = nn.Linear(self.out_channels, num_classes) if num_classes else None
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = trunk_forward(self, x)
        if self.fc is None:
            return features
        return self.fc(torch.flatten(features.mean(dim=(2, 3)), 1))

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Intermediate features: dict stem, layer1, layer2, layer3, layer4 (see :func:`trunk_forward`)."""
        return trunk_forward(self, x, return_stages=True)


def resnet18(**kwargs) -> ResNet:
    return ResNet(18, **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(34, **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(50, **kwargs)


def resnet101(**kwargs) -> ResNet:
    return ResNet(101, **kwargs)

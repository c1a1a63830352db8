"""Building blocks of the DaNet port (Zhang et al., TPAMI 2020), with the official state-dict key names.

Only the parts that DaNet's h36m_itw inference path runs are here:

- :class:`IUVPredictLayer` (``img2iuv.iuv_est.final_pred.*``): global IUV heads (U, V, part index, 14-part
  annotation index), the 24 joint heatmaps used to place the RoIs, and the grouped head that predicts the
  24 partial IUV maps from RoI-pooled features.
- :class:`ResNetStream` (``body_net.*`` / ``limb_net.*``): 1x1 stem (IUV channels -> 64) + a ResNet-18 whose
  first conv takes 64 channels; the global stream ends in a 13-way linear layer (camera 3 + betas 10), the
  limb stream stops after layer3.
- :class:`LimbResLayer` (``limb_reslayer.*``): ResNet-18's layer4 as 24-group convolutions, one group per joint.
- :class:`GCN`: Kipf-style graph convolutions ``BN(A @ X @ W + b) -> ReLU`` over the 24 joints.
- :func:`graph_buffers`: the fixed adjacency matrices DaNet registers as buffers.

Everything runs batched on CPU or CUDA.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# torchvision-layout residual blocks; groups > 1 gives DaNet's 24 side-by-side per-joint blocks
from occbench.models.backbones.resnet import BasicBlock, Bottleneck
from occbench.models.backbones.resnet import make_res_layer as make_layer

NUM_JOINTS = 24
# SMPL kinematic tree as DaNet writes it: the root is its own parent.
SMPL_PARENTS = (0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)
# DaNet's "child" of each joint used for the RoI size (leaves point at themselves).
SMPL_CHILDREN = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 10, 11, 15, 16, 17, 15, 18, 19, 20, 21, 22, 23, 22, 23)
# DensePose part indices (1..24) around each SMPL joint: the joint's RoI counts as hidden when none of
# them is predicted at the joint centre.
SMPL_TO_DENSEPOSE_PARTS = (
    (1, 2), (8, 10), (7, 9), (1, 2), (8, 10, 12, 14), (7, 9, 11, 13), (1, 2), (12, 14, 5), (11, 13, 6),
    (1, 2), (12, 14, 5), (11, 13, 6), (1, 2, 23, 24), (15, 17), (16, 18), (23, 24), (15, 17), (16, 18),
    (15, 17, 19, 21), (16, 18, 20, 22), (19, 21, 4), (20, 22, 3), (19, 21, 4), (20, 22, 3))
# Kinematic neighbours (the 'smpl' graph) and the denser refinement graph ('smpl_2neigh' + extra links).
SMPL_LIMBS = ((0, 1), (1, 4), (4, 7), (7, 10), (0, 2), (2, 5), (5, 8), (8, 11), (0, 3), (3, 6), (6, 9),
              (9, 13), (13, 16), (16, 18), (18, 20), (20, 22), (9, 14), (14, 17), (17, 19), (19, 21), (21, 23),
              (9, 12), (12, 15))
REFINE_EXTRA_LINKS = ((12, 17), (12, 16),
                      (0, 4), (0, 5), (0, 6), (2, 8), (1, 7), (5, 11), (4, 10), (3, 9), (6, 12), (9, 15),
                      (6, 13), (9, 16), (13, 18), (16, 20), (18, 22), (6, 14), (9, 17), (14, 19), (17, 21),
                      (19, 23),
                      (1, 2), (1, 3), (2, 3), (13, 14), (12, 13), (12, 14))
NUM_PART_CHANNELS = 7  # background + 6 DensePose parts kept per partial IUV map


# ------------------------------------------------------------------------------------------ IUV heads
class IUVPredictLayer(nn.Module):
    """``final_pred``: heads on the 56x56 HRNet features (feat_dim channels, 48 for HRNet-W48).

    forward(x (B,C,56,56)) -> dict predict_u / predict_v / predict_uv_index (B,25,56,56) logits or values
    (index 0 = background, 1..24 = DensePose parts), predict_ann_index (B,15,56,56) and predict_hm (B,24,56,56)
    joint heatmap logits. ``predict_partial_iuv`` (24 groups) is applied separately to RoI-pooled features.
    """

    def __init__(self, feat_dim: int = 48, part_out_dim: int = NUM_PART_CHANNELS) -> None:
        super().__init__()
        self.predict_u = nn.Conv2d(feat_dim, 25, kernel_size=3, padding=1)
        self.predict_v = nn.Conv2d(feat_dim, 25, kernel_size=3, padding=1)
        self.predict_ann_index = nn.Conv2d(feat_dim, 15, kernel_size=3, padding=1)
        self.predict_uv_index = nn.Conv2d(feat_dim, 25, kernel_size=3, padding=1)
        self.predict_hm = nn.Sequential(make_layer(Bottleneck, feat_dim, feat_dim // 4, 3),
                                        nn.Conv2d(feat_dim, NUM_JOINTS, kernel_size=3, padding=1))
        self.predict_partial_iuv = nn.Conv2d(feat_dim * NUM_JOINTS, part_out_dim * 3 * NUM_JOINTS,
                                             kernel_size=3, padding=1, groups=NUM_JOINTS)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"predict_u": self.predict_u(x), "predict_v": self.predict_v(x),
                "predict_uv_index": self.predict_uv_index(x), "predict_ann_index": self.predict_ann_index(x),
                "predict_hm": self.predict_hm(x)}


# ---------------------------------------------------------------------------------------- ResNet streams
class StreamResNet(nn.Module):
    """DaNet's ResNet-18 over 64-channel input maps. Keys: conv1, bn1, layer1..3[, layer4][, final_layer].

    forward(x (B,64,56,56)) -> (params (B,num_classes) or None, features): features are layer4's output
    (B,512,2,2) for the global stream, or layer3's (B,256,4,4) when ``with_layer4`` is False (limb stream).
    """

    def __init__(self, num_classes: int = 0, with_layer4: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(64, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_layer(BasicBlock, 64, 64, 2)
        self.layer2 = make_layer(BasicBlock, 64, 128, 2, stride=2)
        self.layer3 = make_layer(BasicBlock, 128, 256, 2, stride=2)
        self.layer4 = make_layer(BasicBlock, 256, 512, 2, stride=2) if with_layer4 else None
        self.final_layer = nn.Linear(512, num_classes) if num_classes > 0 else None

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.layer4 is not None:
            x = self.layer4(x)
        params = None
        if self.final_layer is not None:
            params = self.final_layer(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return params, x


def stream(in_channels: int, num_classes: int = 0, with_layer4: bool = True) -> nn.Sequential:
    """1x1 conv (in_channels -> 64, no bias) + BN + ReLU + :class:`StreamResNet`; keys ``0``, ``1``, ``3``."""
    return nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=1, bias=False), nn.BatchNorm2d(64),
                         nn.ReLU(inplace=True), StreamResNet(num_classes, with_layer4))


class LimbResLayer(nn.Module):
    """ResNet-18 layer4 as 24 independent groups: (B, 24*256, h, w) -> rotation features (B, 24*128, 1, 1)."""

    def __init__(self, inplanes: int = 256, outplanes: int = 128, groups: int = NUM_JOINTS) -> None:
        super().__init__()
        self.layer4 = make_layer(BasicBlock, inplanes, outplanes, 2, stride=2, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.layer4(x), 1)


# ---------------------------------------------------------------------------------------------- graphs
class GraphConv(nn.Module):
    """``A @ X @ W + b``. X: (B,N,in_dim), A: (N,N) -> (B,N,out_dim). Keys: weight (in_dim,out_dim), bias."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.weight, gain=nn.init.calculate_gain("relu"))

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(adjacency, x), self.weight) + self.bias


class GCN(nn.Module):
    """Stack of graph convolutions, each followed by BatchNorm over the nodes and ReLU. Keys: gc.i, act.i.0.

    forward(x (B,N,in_dim), adjacency (N,N)) -> (B,N,out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int,
                 num_nodes: int = NUM_JOINTS) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.gc = nn.ModuleList(GraphConv(dims[i], dims[i + 1]) for i in range(num_layers))
        self.act = nn.ModuleList(nn.Sequential(nn.BatchNorm1d(num_nodes), nn.ReLU(inplace=True))
                                 for _ in range(num_layers))

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.gc, self.act):
            x = act(conv(x, adjacency))
        return x


def normalize_symmetric(adjacency: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 with D the column sums of A (zero-degree nodes left at 0), as DaNet's
    ``normalize_undigraph``. adjacency: (N,N) -> (N,N)."""
    degree = adjacency.sum(dim=0)
    inv_sqrt = torch.where(degree > 0, degree.clamp_min(1e-12).rsqrt(), torch.zeros_like(degree))
    return inv_sqrt[:, None] * adjacency * inv_sqrt[None, :]


def normalize_rows(adjacency: np.ndarray) -> np.ndarray:
    """D^-1 A with D the row sums (empty rows stay 0), as DaNet's ``normalize_digraph(AD_mode=False)``."""
    degree = adjacency.sum(axis=1, keepdims=True)
    return np.divide(adjacency, degree, out=np.zeros_like(adjacency), where=degree > 0)


def _symmetric_adjacency(edges) -> np.ndarray:
    a = np.eye(NUM_JOINTS)
    for i, j in edges:
        a[i, j] = a[j, i] = 1.0
    return a


def ancestors(joint: int) -> list[int]:
    """The joint's ancestors along the kinematic chain up to the pelvis (empty for the pelvis)."""
    chain = []
    while joint != 0:
        joint = SMPL_PARENTS[joint]
        chain.append(joint)
    return chain


def graph_buffers() -> dict[str, torch.Tensor]:
    """The fixed (1,24,24) float32 graphs DaNet registers (the checkpoint stores the same values).

    I_n: identity. A_link: kinematic neighbours (no self loops). A_mask: neighbours of the refinement graph
    (one- and two-hop links plus DaNet's extra torso/shoulder links, no self loops); A: that graph with self
    loops, symmetric-normalised (stored, unused at inference). r2p_A: row-normalised ancestor graph (row i
    averages the ancestors of joint i; the pelvis row is empty). p2r_A: row-normalised graph of each joint,
    its parent and its children.
    """
    eye = np.eye(NUM_JOINTS)
    link = _symmetric_adjacency(SMPL_LIMBS)
    refine = _symmetric_adjacency(SMPL_LIMBS + REFINE_EXTRA_LINKS)
    r2p = np.zeros((NUM_JOINTS, NUM_JOINTS))
    p2r = np.eye(NUM_JOINTS)
    for i in range(NUM_JOINTS):
        r2p[i, ancestors(i)] = 1.0
        p2r[i, SMPL_PARENTS[i]] = 1.0
        p2r[i, [c for c, p in enumerate(SMPL_PARENTS) if p == i]] = 1.0
    as_buffer = lambda a: torch.as_tensor(a, dtype=torch.float32).unsqueeze(0)  # noqa: E731
    return {"I_n": as_buffer(eye), "A_link": as_buffer(link - eye),
            "A": normalize_symmetric(as_buffer(refine)[0]).unsqueeze(0),
            "A_mask": as_buffer(refine - eye),
            "r2p_A": as_buffer(normalize_rows(r2p)), "p2r_A": as_buffer(normalize_rows(p2r))}


def init_conv_bn(module: nn.Module) -> None:
    """He-normal convs and unit BatchNorms (random-weight builds only; checkpoints overwrite everything)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

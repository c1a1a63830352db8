"""DaNet (Zhang et al., "Learning 3D Human Shape and Pose from Dense Body Parts", TPAMI 2020), h36m_itw.

The port reproduces the official inference path (``DaNet.infer_net`` of HongwenZhang/DaNet-3DHumanReconstruction
with ``configs/danet_h36m_itw.yaml``) and the layout of ``danet_model_h36m_itw.pt`` (``{'model': state_dict}``):

1. ``img2iuv.iuv_est``: HRNet-W48 (highest-resolution branch only, 224 -> 48 x 56 x 56 features) and its heads
   ``final_pred``: global IUV maps (U, V, 25-way part index), 15-way annotation index, 24 joint heatmaps.
2. Joint-centric RoI pooling: joint centres by soft-argmax over ``10 * heatmaps``; the RoI side of joint k is
   ``s_k * relu(learned_ratio[k]) + relu(learned_offset[k])`` with s_k the larger distance to its parent or child
   (half the joints' extent for the pelvis); a joint whose surrounding parts are not predicted at its centre gets
   ``0.8 x`` the half extent instead. (The paper's Eq. 2 sizes RoIs from the foreground box; the released code,
   followed here, sizes them from the joints as just described.) Features are resampled with ``affine_grid``/``grid_sample`` with
   ``align_corners=True`` (the torch 1.1 behaviour the official code was written for) and the grouped conv
   ``predict_partial_iuv`` gives 24 partial IUV maps (24 x 3 x 7 x 56 x 56: U, V, index of background + 6 parts).
3. IUV maps are "cleaned" (index -> one-hot of its argmax; U, V masked by it).
4. ``iuv2smpl.smpl_para_Outs``: a ResNet-18 global stream on the 75-channel global IUV (camera 3 + betas 10, added to
   ``mean_cam_shape``); a shared ResNet-18 (to layer3) on each 21-channel partial IUV and a 24-group layer4 give
   24 x 128 rotation features; graph refinement rotation -> position (``r2p_A``) -> refined positions (learned
   ``edge_importance`` on ``A_mask``) -> rotation (``p2r_A``); the grouped 1x1 conv ``pose_regressors.1`` predicts
   24 6D rotations, added to ``mean_pose`` and converted with the SPIN 6D layout (DaNet's ``rot6d_to_rotmat`` is
   SPIN's: ``view(-1, 3, 2)`` columns, Gram-Schmidt).

Training-only weights stored in the checkpoint (``rot2pos``, ``pos2rot``, ``coord_regressors``,
``pose_regressors.0``) are not built; models/entries.py lists them as known-unused so the loader reports them.

Mean parameters: the checkpoint stores its own ``mean_pose`` / ``mean_cam_shape`` buffers, which overwrite
whatever ``build(mean_params=...)`` put there; ``mean_params`` only matters for random-weight builds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from occbench.errors import UserError
from occbench.models.backbones.hrnet import HRNet
from occbench.models.base import ZooModel
from occbench.models.danet_modules import (GCN, NUM_JOINTS, NUM_PART_CHANNELS, SMPL_CHILDREN, SMPL_PARENTS,
                                           SMPL_TO_DENSEPOSE_PARTS, IUVPredictLayer, LimbResLayer, graph_buffers,
                                           init_conv_bn, normalize_symmetric, stream)
from occbench.rotations import rot6d_to_rotmat

HEATMAP_BETA = 10.0           # soft-argmax sharpening of the joint heatmaps
HIDDEN_PART_SCORE = 0.5       # STN_PART_VIS_SCORE: below it a joint's RoI falls back to the body size
HIDDEN_SCALE = 0.8            # ... of half the joints' extent
FEAT_DIM = 128                # REFINEMENT.FEAT_DIM
DEFAULT_RATIO, DEFAULT_OFFSET = 1.0, 0.1   # random-weight builds only (paper: delta = 0.1)


# --------------------------------------------------------------------------------- IUV map operations
def clean_iuv(u: torch.Tensor, v: torch.Tensor, index: torch.Tensor, dim: int = 1):
    """DaNet's ``iuvmap_clean``: index logits -> one-hot of their argmax along ``dim``; U and V masked by it.

    u, v, index: same shape (..., C, ...) with C classes along ``dim`` (0 = background). Returns (u, v, one_hot).
    """
    labels = index.argmax(dim=dim, keepdim=True)
    one_hot = torch.zeros_like(index).scatter_(dim, labels, 1.0)
    return u * one_hot, v * one_hot, one_hot


def soft_argmax_centres(heatmaps: torch.Tensor, beta: float = HEATMAP_BETA) -> torch.Tensor:
    """Joint centres from heatmaps, in DaNet's normalised RoI coordinates.

    heatmaps: (B,J,H,W) logits. Softmax over all pixels of ``beta * heatmaps``; expected pixel indices (x, y)
    are mapped by ``idx / (W / 2) - 1`` (DaNet's mapping: pixel 0 -> -1, pixel W -> +1). Returns (B,J,2) (x, y).
    """
    b, j, h, w = heatmaps.shape
    prob = F.softmax(beta * heatmaps.reshape(b, j, h * w), dim=2).reshape(b, j, h, w)
    xs = torch.arange(w, dtype=prob.dtype, device=prob.device)
    ys = torch.arange(h, dtype=prob.dtype, device=prob.device)
    x = (prob.sum(dim=2) * xs).sum(dim=2)
    y = (prob.sum(dim=3) * ys).sum(dim=2)
    return torch.stack([x, y], dim=2) / (0.5 * w) - 1.0


def hidden_joints(index_one_hot: torch.Tensor, centres: torch.Tensor,
                  threshold: float = HIDDEN_PART_SCORE) -> torch.Tensor:
    """Joints whose surrounding DensePose parts are absent at the joint centre.

    index_one_hot: (B,25,H,W) cleaned part index; centres: (B,24,2) normalised. The presence map of joint k is the
    max over its parts (SMPL_TO_DENSEPOSE_PARTS[k]) sampled bilinearly (align_corners=True) at its centre.
    Returns (B,24) bool.
    """
    b, _, h, w = index_one_hot.shape
    presence = torch.stack([index_one_hot[:, list(parts)].amax(dim=1) for parts in SMPL_TO_DENSEPOSE_PARTS], 1)
    score = F.grid_sample(presence.reshape(b * NUM_JOINTS, 1, h, w), centres.reshape(b * NUM_JOINTS, 1, 1, 2),
                          mode="bilinear", padding_mode="zeros", align_corners=True)
    return score.reshape(b, NUM_JOINTS) < threshold


def roi_scales(centres: torch.Tensor, ratio: torch.Tensor, offset: torch.Tensor,
               hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Half side of each joint's RoI in normalised coordinates (DaNet's ``affine_para``).

    centres: (B,24,2); ratio, offset: (24,); hidden: (B,24) bool or None. Pelvis: half the largest side of the
    joints' bounding box; other joints: the larger distance to the parent or to DaNet's child joint. Then
    ``* relu(ratio) + relu(offset)``; hidden joints other than the pelvis get ``0.8 *`` the pelvis base size.
    Returns (B,24).
    """
    box_half = (centres.amax(dim=1) - centres.amin(dim=1)).amax(dim=1) / 2.0          # (B,)
    to_parent = (centres[:, list(SMPL_PARENTS)] - centres).norm(dim=2)
    to_child = (centres[:, list(SMPL_CHILDREN)] - centres).norm(dim=2)
    base = torch.maximum(to_parent, to_child)
    base = torch.cat([box_half[:, None], base[:, 1:]], dim=1)
    scales = base * F.relu(ratio) + F.relu(offset)
    if hidden is not None:
        fallback = HIDDEN_SCALE * box_half[:, None].expand_as(scales)
        use_fallback = hidden.clone()
        use_fallback[:, 0] = False
        scales = torch.where(use_fallback, fallback, scales)
    return scales


def roi_thetas(centres: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Affine matrices [[s, 0, cx], [0, s, cy]] of the RoIs: (B,J,2) centres, (B,J) scales -> (B,J,2,3)."""
    zeros = torch.zeros_like(scales)
    row_x = torch.stack([scales, zeros, centres[..., 0]], dim=-1)
    row_y = torch.stack([zeros, scales, centres[..., 1]], dim=-1)
    return torch.stack([row_x, row_y], dim=-2)


def roi_pool(features: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """Resample one RoI per joint at the input resolution (STN with ``align_corners=True``, zero padding).

    features: (B,C,H,W); thetas: (B,J,2,3) -> (B,J,C,H,W). Output pixel (i, j) samples the input at normalised
    ``theta @ [x_j, y_i, 1]`` with x_j = -1 + 2 j / (W - 1), so the identity theta returns the input exactly.
    """
    b, c, h, w = features.shape
    j = thetas.shape[1]
    grid = F.affine_grid(thetas.reshape(b * j, 2, 3), [b * j, c, h, w], align_corners=True)
    stacked = features[:, None].expand(b, j, c, h, w).reshape(b * j, c, h, w)
    pooled = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return pooled.reshape(b, j, c, h, w)


# ------------------------------------------------------------------------------------------ modules
class IUVNet(HRNet):
    """``img2iuv.iuv_est``: HRNet-W48 (one fused output branch) + ``final_pred`` heads.

    forward(images (B,3,224,224)) -> (features (B,48,56,56), heads dict of :class:`IUVPredictLayer`).
    """

    def __init__(self) -> None:
        super().__init__(width=48, output="highres", multi_scale_output=False)
        self.final_pred = IUVPredictLayer(feat_dim=48, part_out_dim=NUM_PART_CHANNELS)
        for m in self.final_pred.modules():  # the official normal(0, 0.001) head initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor):
        features = super().forward(images)
        return features, self.final_pred(features)


class IUVEstimator(nn.Module):
    """``img2iuv``: global IUV maps, joint-centric RoI pooling and partial IUV maps.

    forward(images (B,3,224,224) normalized) -> dict:
      u, v, index: (B,25,56,56) raw global predictions; ann_index (B,15,56,56); heatmaps (B,24,56,56);
      centres (B,24,2) normalised RoI centres; hidden (B,24) bool; scales (B,24) RoI half sides;
      part_iuv (B,24,3,7,56,56) raw partial predictions (U, V, index of background + 6 parts).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("learned_ratio", torch.full((NUM_JOINTS,), DEFAULT_RATIO))
        self.register_buffer("learned_offset", torch.full((NUM_JOINTS,), DEFAULT_OFFSET))
        self.iuv_est = IUVNet()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features, heads = self.iuv_est(images)
        _, _, index_one_hot = clean_iuv(heads["predict_u"], heads["predict_v"], heads["predict_uv_index"])
        centres = soft_argmax_centres(heads["predict_hm"])
        hidden = hidden_joints(index_one_hot, centres)
        scales = roi_scales(centres, self.learned_ratio, self.learned_offset, hidden)
        pooled = roi_pool(features, roi_thetas(centres, scales))              # (B,24,48,56,56)
        b, j, c, h, w = pooled.shape
        part_iuv = self.iuv_est.final_pred.predict_partial_iuv(pooled.reshape(b, j * c, h, w))
        return {"u": heads["predict_u"], "v": heads["predict_v"], "index": heads["predict_uv_index"],
                "ann_index": heads["predict_ann_index"], "heatmaps": heads["predict_hm"], "centres": centres,
                "hidden": hidden, "scales": scales,
                "part_iuv": part_iuv.reshape(b, j, 3, NUM_PART_CHANNELS, h, w)}


class DecomposedRegressor(nn.Module):
    """``iuv2smpl.smpl_para_Outs``: global stream (camera, betas) and per-joint streams with graph refinement.

    forward(iuv_map (B,75,56,56) cleaned [U(25), V(25), index(25)], part_iuv (B,24,3,7,56,56) cleaned)
      -> (cam (B,3), betas (B,10), rotmat (B,24,3,3)).
    """

    def __init__(self, mean_cam_shape: torch.Tensor, mean_pose: torch.Tensor) -> None:
        super().__init__()
        self.edge_importance = nn.Parameter(torch.ones(1, NUM_JOINTS, NUM_JOINTS))
        self.register_buffer("mean_cam_shape", mean_cam_shape.reshape(1, 13).float())
        self.register_buffer("mean_pose", mean_pose.reshape(1, NUM_JOINTS * 6).float())
        for name, value in graph_buffers().items():
            self.register_buffer(name, value)
        self.body_net = stream(3 * 25, num_classes=13)
        self.limb_net = stream(3 * NUM_PART_CHANNELS, num_classes=0, with_layer4=False)
        self.limb_reslayer = LimbResLayer(inplanes=256, outplanes=FEAT_DIM, groups=NUM_JOINTS)
        # Only the refined-feature pose head (index 1) runs at inference; index 0 is training-only.
        self.pose_regressors = nn.ModuleDict({"1": nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(FEAT_DIM * NUM_JOINTS, 6 * NUM_JOINTS, kernel_size=1, groups=NUM_JOINTS))})
        self.refine_gcn = GCN(FEAT_DIM, 256, FEAT_DIM, num_layers=3)
        self.r2p_gcn = GCN(FEAT_DIM, FEAT_DIM, FEAT_DIM, num_layers=1)
        self.p2r_gcn = GCN(FEAT_DIM, FEAT_DIM, FEAT_DIM, num_layers=1)
        init_conv_bn(self)
        nn.init.xavier_uniform_(self.body_net[3].final_layer.weight, gain=0.01)
        nn.init.zeros_(self.body_net[3].final_layer.bias)
        nn.init.xavier_uniform_(self.pose_regressors["1"][1].weight, gain=0.01)

    def refinement_graph(self) -> torch.Tensor:
        """(24,24) normalised refinement graph I + A_mask * relu(edge_importance)."""
        return normalize_symmetric(self.I_n[0] + self.A_mask[0] * F.relu(self.edge_importance[0]))

    def forward(self, iuv_map: torch.Tensor, part_iuv: torch.Tensor):
        b = iuv_map.shape[0]
        cam_shape, _ = self.body_net(iuv_map)
        cam_shape = cam_shape + self.mean_cam_shape

        size = part_iuv.shape[-1]
        _, limb_feat = self.limb_net(part_iuv.reshape(b * NUM_JOINTS, 3 * NUM_PART_CHANNELS, size, size))
        limb_feat = limb_feat.reshape(b, NUM_JOINTS * limb_feat.shape[1], *limb_feat.shape[-2:])
        rot_feats = self.limb_reslayer(limb_feat).reshape(b, NUM_JOINTS, FEAT_DIM)

        pos_feats = self.r2p_gcn(rot_feats, self.r2p_A[0])
        pos_feats = pos_feats + self.refine_gcn(pos_feats, self.refinement_graph())
        rot_feats = self.p2r_gcn(pos_feats, self.p2r_A[0])

        pose6d = self.pose_regressors["1"](rot_feats.reshape(b, NUM_JOINTS * FEAT_DIM, 1, 1)).reshape(b, -1)
        pose6d = pose6d + self.mean_pose
        rotmat = rot6d_to_rotmat(pose6d).reshape(b, NUM_JOINTS, 3, 3)
        return cam_shape[:, :3], cam_shape[:, 3:13], rotmat


class SMPLRegressor(nn.Module):
    """``iuv2smpl``: holds ``smpl_para_Outs`` (the official module's SMPL copy is not saved in the checkpoint)."""

    def __init__(self, mean_cam_shape: torch.Tensor, mean_pose: torch.Tensor) -> None:
        super().__init__()
        self.smpl_para_Outs = DecomposedRegressor(mean_cam_shape, mean_pose)

    def forward(self, iuv_map: torch.Tensor, part_iuv: torch.Tensor):
        return self.smpl_para_Outs(iuv_map, part_iuv)


class DaNet(ZooModel):
    """DaNet h36m_itw. ``regress(images (B,3,224,224) ImageNet-normalized)`` -> (rotmat (B,24,3,3), betas (B,10),
    cam (B,3), extras) with extras:

      iuv_map (B,75,56,56): cleaned global IUV [U(25), V(25), one-hot index(25)];
      part_iuv_map (B,24,3,7,56,56): cleaned partial IUV per joint;
      joint_centres (B,24,2): RoI centres in DaNet's normalised coordinates (pixel p of 56 at p / 28 - 1);
      roi_scales (B,24): RoI half sides (same units); hidden_joints (B,24) bool; heatmaps (B,24,56,56).
    """

    name = "danet"
    input_size = 224

    def __init__(self, mean_cam_shape: torch.Tensor, mean_pose: torch.Tensor) -> None:
        super().__init__()
        self.img2iuv = IUVEstimator()
        self.iuv2smpl = SMPLRegressor(mean_cam_shape, mean_pose)

    def regress(self, images: torch.Tensor):
        iuv = self.img2iuv(images)
        u, v, index = clean_iuv(iuv["u"], iuv["v"], iuv["index"])
        iuv_map = torch.cat([u, v, index], dim=1)
        part = iuv["part_iuv"]
        part_u, part_v, part_index = clean_iuv(part[:, :, 0], part[:, :, 1], part[:, :, 2], dim=2)
        part_iuv_map = torch.stack([part_u, part_v, part_index], dim=2)
        cam, betas, rotmat = self.iuv2smpl(iuv_map, part_iuv_map)
        extras = {"iuv_map": iuv_map, "part_iuv_map": part_iuv_map, "joint_centres": iuv["centres"],
                  "roi_scales": iuv["scales"], "hidden_joints": iuv["hidden"], "heatmaps": iuv["heatmaps"]}
        return rotmat, betas, cam, extras


def build(mean_params: dict | None = None, **options) -> DaNet:
    """DaNet h36m_itw with random weights. No architecture options.

    mean_params: dict pose (144,) 6D, shape (10,), cam (3,) (SPIN's smpl_mean_params.npz) used to fill the
    ``mean_pose`` / ``mean_cam_shape`` buffers; None takes :func:`occbench.body.load_mean_params`. A loaded
    checkpoint overwrites both buffers with its own values.
    """
    if options:
        raise UserError(f"model 'danet' has no options; got {', '.join(sorted(options))} "
                        f"(DaNet is released in its h36m_itw configuration only)")
    if mean_params is None:
        from occbench.body import load_mean_params
        mean_params = load_mean_params()
    as_tensor = lambda key: torch.as_tensor(mean_params[key], dtype=torch.float32).reshape(-1)  # noqa: E731
    mean_cam_shape = torch.cat([as_tensor("cam"), as_tensor("shape")])
    return DaNet(mean_cam_shape, as_tensor("pose"))

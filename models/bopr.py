"""BoPR: Body-aware Part Regressor (Cheng et al., 2023), implemented from the paper (Sec. 3).

There is no public code and no released checkpoint. This module is occbench's own implementation; its
``state_dict()`` layout is occbench's own and is written to ``models/manifests/bopr_<backbone>.tsv``
(``python -m occbench.models.bopr --write-manifests``), so that a model trained with occbench loads back
strictly. Checkpoints are ``{'model': state_dict, 'occbench': {...}}`` (:meth:`BoPR.save_checkpoint`).

Data flow (B batch, H = W = input_size / 4, 56 for 224 px input)::

    images (B,3,224,224)
      -> backbone HRNet-W32|W48, branches upsampled and concatenated: (B,480|720,56,56)
      -> attention_layers (2 x conv3x3-BN-ReLU, 128)  -> body_attention (B,1,H,W), part_attention (B,24,H,W)
      -> feature_layers   (2 x conv3x3-BN-ReLU, 128)  -> F_2D (B,32,H,W), F_3D (B,32,H,W), F_part (B,64,H,W)
      F_brf = spatial-softmax(body_attention) . [F_2D, F_3D]            (B,64)      (paper Eq. 1)
      F_pqf = spatial-softmax(part_attention) . F_part                   (B,24,64)
      tokens t_i = F_pqf[i] (+) F_brf + token_embedding[i]               (B,24,128)
      -> body-aware transformer (2 layers, dim 128)                      (B,24,128)  F_bapf (Eq. 2)
      -> regression transformer (1 layer, dim 128)                       (B,24,128)
      -> pose_head (per part, 6D), depth_head (24 x 3), shape_head / cam_head over the 24 x 128 tokens
      pose = init_pose + delta (6D, SPIN/PARE convention), betas = init_shape + delta, cam = init_cam + delta

Choices the paper leaves open (all documented here, none taken from unpublished code):

1. Encoder trunk: BoPR is built on PARE (paper Table 5 ablates "PARE w TF"), so the backbone features pass
   through PARE's two branches of two conv3x3(128)-BN-ReLU layers: one for the attention maps, one for the
   feature volumes. The paper's "four convolutional layers" are the 1x1 output convs on these branches
   (body attention, body 2D/3D features, part attention, part features; five maps, as Sec. 3.2 lists).
2. Channel widths: C = C' = 32 (F_2D, F_3D), C'' = 64 (F_part), so a token F_pqf (+) F_brf has exactly the
   transformer width 128 and needs no input projection.
3. sigma in Eq. 1 is the spatial softmax over the H x W positions (PARE's attention normalisation); the
   pooled feature is the softmax-weighted sum. The raw logits are returned in ``extras`` for the
   segmentation losses (binary CE for the body map, per-pixel CE over the 24 part maps on body pixels).
4. Auxiliary 2D / 3D keypoint supervision of the body reference feature (Sec. 3.2, L_Aux2D / L_Aux3D):
   linear layers on the F_2D half and the F_3D half of F_brf predict the 24 SMPL joints in 2D
   (normalised crop coordinates in [-1, 1]) and 3D (metres, pelvis-relative).
5. Transformers: Eq. 2 writes LN(QK^T / sqrt(d_k)) V; we use the standard softmax attention (8 heads) with
   the post-norm residual structure of Eq. 2 (LN(T + Attn(T))) followed by a post-norm feed-forward block
   (128 -> 512 -> 128, GELU); dropout 0.1 in training. A learned per-part token embedding (24 x 128,
   std 0.02) tells the transformer which part a token belongs to.
6. Heads: per-part linear 128 -> 6 (6D rotation of SMPL joint i from token i, like PARE's per-part pose
   MLP), shared linear 128 -> 3 for the relative depths, linear 24*128 -> 10 (shape) and -> 3 (camera).
   Outputs are residuals added to SPIN's mean parameters (``init_pose`` / ``init_shape`` / ``init_cam``
   buffers); their output layers start with xavier_uniform(gain=0.01) so an untrained model predicts the
   mean. The depth head (no mean to start from) keeps PyTorch's default initialisation.
7. Relative depths (Sec. 3.3, Fig. 3): the targets are the signed distances of the 24 part centres (mean
   of the vertices of each SMPL part) to three torso planes through the pelvis: frontal (normal
   left x up, pointing forward), side (normal left-right from right hip to left hip) and cross-section
   (normal pelvis -> shoulder midpoint); see :func:`relative_torso_depths`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from occbench.models.base import ZooModel

NUM_PARTS = 24
TOKEN_DIM = 128
BACKBONE_CHANNELS = {"hrnet_w32": 32 + 64 + 128 + 256, "hrnet_w48": 48 + 96 + 192 + 384}
MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"

# SMPL joint indices used by the torso planes.
PELVIS, LEFT_HIP, RIGHT_HIP, LEFT_SHOULDER, RIGHT_SHOULDER = 0, 1, 2, 16, 17


def build_backbone(name: str) -> nn.Module:
    """HRNet whose forward maps (B,3,S,S) to the concatenated, upsampled branches (B,C,S/4,S/4)."""
    if name not in BACKBONE_CHANNELS:
        raise ValueError(f"bopr: backbone must be one of {sorted(BACKBONE_CHANNELS)}, not {name!r}")
    from occbench.models.backbones.hrnet import HRNet
    return HRNet(width=int(name[-2:]), output="concat_conv")


def _conv_branch(in_channels: int, channels: int = 128) -> nn.Sequential:
    layers = []
    for i in range(2):
        layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class TransformerLayer(nn.Module):
    """Post-norm transformer encoder layer (paper Eq. 2 + feed-forward). (B,N,dim) -> (B,N,dim)."""

    def __init__(self, dim: int = TOKEN_DIM, heads: int = 8, ffn_dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn1 = nn.Linear(dim, ffn_dim)
        self.ffn2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape

        def split(x):
            return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(tokens)), split(self.key(tokens)), split(self.value(tokens))
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout.p if self.training else 0.0)
        attn = self.out(attn.transpose(1, 2).reshape(b, n, d))
        x = self.norm1(tokens + self.dropout(attn))
        return self.norm2(x + self.dropout(self.ffn2(self.dropout(F.gelu(self.ffn1(x))))))


class PerPartLinear(nn.Module):
    """Independent linear map per part: (B,P,in) -> (B,P,out), weight (P,out,in)."""

    def __init__(self, parts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(parts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(parts, out_features))
        for w in self.weight:
            nn.init.xavier_uniform_(w, gain=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bpi,poi->bpo", x, self.weight) + self.bias


def spatial_softmax_pool(attention_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(B,K,H,W) logits, (B,C,H,W) features -> (B,K,C) softmax-weighted sums over H x W."""
    weights = F.softmax(attention_logits.flatten(2), dim=-1)
    return torch.einsum("bkn,bcn->bkc", weights, features.flatten(2))


class BoPR(ZooModel):
    """Body-aware Part Regressor. ``regress(images (B,3,S,S))`` -> rotmat, betas, cam, extras.

    extras: pose6d (B,144), rel_depth (B,24,3) [m], aux_joints2d (B,24,2) [normalised crop coords],
    aux_joints3d (B,24,3) [m, pelvis-relative], body_attention (B,1,H,W) and part_attention (B,24,H,W)
    logits, tokens (B,24,128) (body-aware part features F_bapf).
    """

    name = "bopr"
    input_size = 224

    def __init__(self, mean_params: dict, backbone: str = "hrnet_w32", dropout: float = 0.1,
                 body_channels: int = 32, part_channels: int = 64):
        super().__init__()
        if 2 * body_channels + part_channels != TOKEN_DIM:
            raise ValueError(f"bopr: 2 * body_channels + part_channels must be {TOKEN_DIM}")
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone)
        in_channels = BACKBONE_CHANNELS[backbone]
        self.body_channels = body_channels

        self.attention_layers = _conv_branch(in_channels)
        self.feature_layers = _conv_branch(in_channels)
        self.body_attention = nn.Conv2d(128, 1, 1)
        self.part_attention = nn.Conv2d(128, NUM_PARTS, 1)
        self.body_2d_features = nn.Conv2d(128, body_channels, 1)
        self.body_3d_features = nn.Conv2d(128, body_channels, 1)
        self.part_features = nn.Conv2d(128, part_channels, 1)
        self.aux_joints2d = nn.Linear(body_channels, NUM_PARTS * 2)
        self.aux_joints3d = nn.Linear(body_channels, NUM_PARTS * 3)

        self.token_embedding = nn.Parameter(torch.randn(1, NUM_PARTS, TOKEN_DIM) * 0.02)
        self.body_aware_transformer = nn.ModuleList(TransformerLayer(dropout=dropout) for _ in range(2))
        self.regression_transformer = nn.ModuleList([TransformerLayer(dropout=dropout)])

        self.pose_head = PerPartLinear(NUM_PARTS, TOKEN_DIM, 6)
        self.depth_head = nn.Linear(TOKEN_DIM, 3)
        self.shape_head = nn.Linear(NUM_PARTS * TOKEN_DIM, 10)
        self.cam_head = nn.Linear(NUM_PARTS * TOKEN_DIM, 3)
        for layer in (self.shape_head, self.cam_head):
            nn.init.xavier_uniform_(layer.weight, gain=0.01)
            nn.init.zeros_(layer.bias)

        self.register_buffer("init_pose", _mean(mean_params, "pose", 144))
        self.register_buffer("init_shape", _mean(mean_params, "shape", 10))
        self.register_buffer("init_cam", _mean(mean_params, "cam", 3))

    def regress(self, images: torch.Tensor):
        return self.regress_from_features(self.backbone(images))

    def regress_from_features(self, features: torch.Tensor):
        """Backbone features (B,C,H,W) -> (rotmat (B,24,3,3), betas (B,10), cam (B,3), extras)."""
        from occbench.rotations import rot6d_to_rotmat

        b = features.shape[0]
        att = self.attention_layers(features)
        feat = self.feature_layers(features)
        body_att, part_att = self.body_attention(att), self.part_attention(att)
        f2d, f3d = self.body_2d_features(feat), self.body_3d_features(feat)
        body_ref = spatial_softmax_pool(body_att, torch.cat([f2d, f3d], 1))[:, 0]      # (B,64)
        part_query = spatial_softmax_pool(part_att, self.part_features(feat))          # (B,24,64)

        aux2d = self.aux_joints2d(body_ref[:, :self.body_channels]).view(b, NUM_PARTS, 2)
        aux3d = self.aux_joints3d(body_ref[:, self.body_channels:]).view(b, NUM_PARTS, 3)

        tokens = torch.cat([part_query, body_ref[:, None].expand(-1, NUM_PARTS, -1)], -1)
        tokens = tokens + self.token_embedding
        for layer in self.body_aware_transformer:
            tokens = layer(tokens)
        body_aware = tokens
        for layer in self.regression_transformer:
            tokens = layer(tokens)

        pose6d = self.init_pose + self.pose_head(tokens).reshape(b, NUM_PARTS * 6)
        flat = tokens.reshape(b, NUM_PARTS * TOKEN_DIM)
        betas = self.init_shape + self.shape_head(flat)
        cam = self.init_cam + self.cam_head(flat)
        rotmat = rot6d_to_rotmat(pose6d.reshape(-1, 6)).view(b, NUM_PARTS, 3, 3)
        extras = {"pose6d": pose6d, "rel_depth": self.depth_head(tokens), "aux_joints2d": aux2d,
                  "aux_joints3d": aux3d, "body_attention": body_att, "part_attention": part_att,
                  "tokens": body_aware}
        return rotmat, betas, cam, extras

    def save_checkpoint(self, path, **meta) -> None:
        """:meth:`ZooModel.save_checkpoint` with the backbone recorded."""
        super().save_checkpoint(path, backbone=self.backbone_name, **meta)

    def training_losses(self, body, rotmat, betas, cam, extras, batch, *, weights: dict, use_part_loss: bool,
                        pelvis: str = "h36m-root") -> dict:
        """The paper's loss (:func:`compute_losses`) on the batch's SMPL targets, with the body and part
        attention terms when the batch has part labels. ``weights`` (PARE's terms) and ``pelvis`` do not
        apply: the loss is on SMPL joints relative to SMPL joint 0."""
        from occbench.losses import resize_labels
        target = {"rotmat": batch.rotmat, "betas": batch.betas, "joints3d": batch.smpl_joints,
                  "joints2d": batch.smpl_joints2d, "rel_depth": batch.rel_depth}
        if batch.parts is not None and use_part_loss:
            labels = resize_labels(batch.parts, extras["part_attention"].shape[-1])
            target["body_mask"] = (labels > 0).float()
            target["part_map"] = labels - 1                     # -1 = background, ignored by the part CE
        return compute_losses(rotmat, betas, cam, extras, target, body)


def _mean(mean_params: dict, key: str, size: int) -> torch.Tensor:
    value = torch.as_tensor(mean_params[key], dtype=torch.float32).reshape(1, -1)
    if value.shape[1] != size:
        raise ValueError(f"mean_params[{key!r}] must have {size} values, got {value.shape[1]}")
    return value


def build(mean_params: dict | None = None, backbone: str = "hrnet_w32", **options) -> BoPR:
    """Random-weight BoPR. mean_params None -> occbench.body.load_mean_params()."""
    if mean_params is None:
        from occbench.body import load_mean_params
        mean_params = load_mean_params()
    return BoPR(mean_params, backbone=backbone, **options)


# ----------------------------------------------------------------------------------------------- targets
def part_centres(vertices: torch.Tensor, part_labels: torch.Tensor) -> torch.Tensor:
    """(B,6890,3) vertices, (6890,) labels in 0..23 -> (B,24,3) mean vertex of each SMPL part."""
    one_hot = F.one_hot(part_labels.long().to(vertices.device), NUM_PARTS).to(vertices.dtype)  # (V,24)
    return torch.einsum("vp,bvc->bpc", one_hot, vertices) / one_hot.sum(0).clamp_min(1)[None, :, None]


def torso_frame(joints_smpl: torch.Tensor):
    """(B,24,3) SMPL joints -> origin (B,3) and unit normals (B,3,3): rows frontal, side, cross-section."""
    origin = joints_smpl[:, PELVIS]
    up = F.normalize(0.5 * (joints_smpl[:, LEFT_SHOULDER] + joints_smpl[:, RIGHT_SHOULDER]) - origin, dim=-1)
    left = joints_smpl[:, LEFT_HIP] - joints_smpl[:, RIGHT_HIP]
    left = F.normalize(left - (left * up).sum(-1, keepdim=True) * up, dim=-1)
    front = torch.cross(left, up, dim=-1)          # SMPL rest pose: x left, y up -> z forward
    return origin, torch.stack([front, left, up], dim=1)


def relative_torso_depths(points: torch.Tensor, joints_smpl: torch.Tensor) -> torch.Tensor:
    """Signed distances (B,24,3) [m] of points (B,24,3) to the frontal, side and cross-section torso planes."""
    origin, normals = torso_frame(joints_smpl)
    return torch.einsum("bpc,bkc->bpk", points - origin[:, None], normals)


def segmentation_targets(points2d: torch.Tensor, part_labels: torch.Tensor, size: int,
                         crop_size: int = 224):
    """Splat projected vertices into a size x size grid (paper Sec. 3.4).

    points2d: (B,V,2) crop pixels; part_labels (V,). Returns body mask (B,size,size) float in {0,1} and
    part map (B,size,size) int64 with -1 on background (the ignore index of the part CE loss).
    """
    b, v, _ = points2d.shape
    cells = (points2d / crop_size * size).floor().long()
    inside = ((cells >= 0) & (cells < size)).all(-1)
    flat = (cells[..., 1].clamp(0, size - 1) * size + cells[..., 0].clamp(0, size - 1))
    part_map = torch.full((b, size * size), -1, dtype=torch.long, device=points2d.device)
    labels = part_labels.long().to(points2d.device).expand(b, v)
    batch = torch.arange(b, device=points2d.device)[:, None].expand(b, v)
    part_map[batch[inside], flat[inside]] = labels[inside]
    part_map = part_map.view(b, size, size)
    return (part_map >= 0).float(), part_map


def weak_perspective_2d(points: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """(B,J,3) points, (B,3) [s, tx, ty] -> (B,J,2) s * (xy + t): the papers' s Pi(X) + t, in normalised
    crop coordinates ([-1, 1] over the 224 px crop; equal to ``project_to_crop`` / 112 - 1 for a far camera)."""
    return cam[:, None, :1] * (points[..., :2] + cam[:, None, 1:])


def compute_losses(rotmat, betas, cam, extras, target: dict, body_model, weights: dict | None = None) -> dict:
    """Paper Eq. 3-4. target: rotmat (B,24,3,3), betas (B,10), joints3d (B,24,3) pelvis-relative SMPL
    joints [m], joints2d (B,24,2) crop px, rel_depth (B,24,3) [m]; optional body_mask (B,H,W) and
    part_map (B,H,W) (-1 = background, ignored) from :func:`segmentation_targets`.

    The paper gives no loss weights; the defaults are SPIN's (3D and 2D keypoints 5, pose 1, betas 0.001)
    and 1 for the relative depths, 0.1 for the attention maps. Returns scalar terms and 'total'.
    """
    w = {"2d": 5.0, "3d": 5.0, "pose": 1.0, "betas": 0.001, "rd": 1.0, "att": 0.1, **(weights or {})}
    out = body_model(rotmat=rotmat, betas=betas)
    joints = out.joints_smpl - out.joints_smpl[:, :1]
    gt2d = target["joints2d"] / 112.0 - 1.0
    terms = {
        "3d": w["3d"] * F.mse_loss(joints, target["joints3d"]),
        "2d": w["2d"] * F.mse_loss(weak_perspective_2d(out.joints_smpl, cam), gt2d),
        "smpl": w["pose"] * F.mse_loss(rotmat, target["rotmat"]) + w["betas"] * F.mse_loss(betas, target["betas"]),
        "rd": w["rd"] * F.mse_loss(extras["rel_depth"], target["rel_depth"]),
        "aux2d": w["2d"] * F.mse_loss(extras["aux_joints2d"], gt2d),
        "aux3d": w["3d"] * F.mse_loss(extras["aux_joints3d"], target["joints3d"]),
    }
    if "body_mask" in target:
        terms["b_seg"] = w["att"] * F.binary_cross_entropy_with_logits(
            extras["body_attention"][:, 0], target["body_mask"])
    if "part_map" in target:
        terms["p_seg"] = w["att"] * F.cross_entropy(extras["part_attention"], target["part_map"],
                                                    ignore_index=-1)
    terms["total"] = sum(terms.values())
    return terms


# --------------------------------------------------------------------------------------------- manifests
def manifest_lines(model: nn.Module) -> list[str]:
    """One ``key<TAB>shape tuple<TAB>dtype`` line per state_dict entry, in order (reference manifest format)."""
    return [f"{k}\t{tuple(v.shape)}\t{str(v.dtype).replace('torch.', '')}" for k, v in model.state_dict().items()]


def manifest_path(backbone: str) -> Path:
    return MANIFEST_DIR / f"bopr_{backbone}.tsv"


def write_manifests() -> list[Path]:
    """Regenerate models/manifests/bopr_<backbone>.tsv from the code (run after a layout change)."""
    MANIFEST_DIR.mkdir(exist_ok=True)
    mean = {"pose": torch.zeros(144), "shape": torch.zeros(10), "cam": torch.zeros(3)}
    paths = []
    for backbone in BACKBONE_CHANNELS:
        path = manifest_path(backbone)
        path.write_text("\n".join(manifest_lines(BoPR(mean, backbone=backbone))) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-manifests", action="store_true")
    if parser.parse_args().write_manifests:
        for p in write_manifests():
            print(p)

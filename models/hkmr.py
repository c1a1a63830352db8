"""HKMR: Hierarchical Kinematic Human Mesh Recovery (Georgakis et al., ECCV 2020), from the paper (Sec. 3.2).

There is no public code and no released checkpoint: the ``state_dict()`` layout is occbench's own
(``encoder.*`` = torchvision ResNet-50 names without ``fc``; ``chains.<name>.*``, ``shape_net.*``,
``cam_net.*``, buffers ``init_pose`` (1,72) axis-angle, ``init_shape`` (1,10), ``init_cam`` (1,3)).
Checkpoints are ``{'model': state_dict, 'occbench': {...}}`` (:meth:`HKMR.save_checkpoint`).

Data flow::

    images (B,3,224,224) -> ResNet-50 -> global average pool -> Phi (B,2048)
    Theta^0, beta^0, cam^0 = SPIN mean parameters (pose converted from 6D to axis-angle)
    for t in 1..T (outer iterations, T = 3):
        theta_root^t = Q_root(Phi, beta^{t-1}, theta_root^{t-1})
        theta_c^t    = Q_c(Phi, beta^{t-1}, theta_c^{t-1}, theta_root^t)     c = the five child chains
        beta^t       = beta^{t-1} + shape_net(Phi, beta^{t-1}, Theta^t)
        cam^t        = cam^{t-1}  + cam_net(Phi, Theta^t, beta^t, cam^{t-1})
    Q_c (inner iterations, P = 4): alternately a forward pass (first joint of the chain to the last) and a
    backward pass (last to first); in a pass, joint i's residual is f_i([psi, residuals of the joints
    already visited in this pass]) (paper Eq. 1-2); after each pass theta_c += residuals and the embedding
    psi = E_c(Phi, beta, theta_c[, theta_root]) is recomputed.

Kinematic chains (SMPL joint indices; the order is the forward order along the chain):

    root      0 pelvis, 3 spine1, 6 spine2, 9 spine3
    head      12 neck, 15 head
    right_arm 14 right collar, 17 right shoulder, 19 right elbow, 21 right wrist, 23 right hand
    left_arm  13 left collar, 16 left shoulder, 18 left elbow, 20 left wrist, 22 left hand
    right_leg 2 right hip, 5 right knee, 8 right ankle, 11 right foot
    left_leg  1 left hip, 4 left knee, 7 left ankle, 10 left foot

Choices the paper leaves open (documented, none taken from unpublished code):

1. Pose is axis-angle (paper Sec. 3.2: "chains' angle-axis pose parameters"; f_i outputs three numbers).
   The mean pose (SPIN's 6D) is converted to axis-angle for ``init_pose``.
2. Inner iterations count passes: 4 inner iterations = forward, backward, forward, backward (paper: "the
   forward pass is step p, the backward pass is step p+1"). f_i, b_i, E_c are shared across inner and
   outer iterations (as HMR's regressor is shared across its iterations).
3. E_c is Linear(in, 128)-ReLU-Linear(128, 128)-ReLU; in = 2048 + 10 + 3 K_c (+ 12 for child chains, the
   current root chain pose). f_i / b_i are single linear layers (paper: "one fully-connected layer");
   the first joint of a pass takes psi alone (the paper's [psi, 0]: a zero block adds nothing).
   Their weights start at xavier_uniform(gain=0.01) so an untrained model predicts the mean parameters.
4. shape_net: Linear(2048 + 10 + 72, 256)-ReLU-Linear(256, 10), residual on beta^{t-1}.
   cam_net: Linear(2048 + 72 + 10 + 3, 256)-ReLU-Linear(256, 3), residual on cam^{t-1} (the paper's
   inputs plus the previous camera, as in HMR's iterative error feedback).
   With these widths the model has 26.2M parameters (ResNet-50 23.5M + regressor 2.7M), the paper's count.
5. No dropout; the VAE pose prior of Sec. 3.2 is a training loss and not part of this network.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from occbench.models.base import ZooModel

FEATURE_DIM = 2048
EMBED_DIM = 128
HIDDEN_DIM = 256
CHAINS = (
    ("root", (0, 3, 6, 9)),
    ("head", (12, 15)),
    ("right_arm", (14, 17, 19, 21, 23)),
    ("left_arm", (13, 16, 18, 20, 22)),
    ("right_leg", (2, 5, 8, 11)),
    ("left_leg", (1, 4, 7, 10)),
)
ROOT_DIM = 3 * len(CHAINS[0][1])


def build_encoder() -> nn.Module:
    """torchvision-layout ResNet-50 without ``fc``: (B,3,S,S) -> layer4 features (B,2048,S/32,S/32)."""
    from occbench.models.backbones.resnet import resnet50
    return resnet50()


def _small_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(layer.weight, gain=0.01)
    nn.init.zeros_(layer.bias)
    return layer


class ChainRegressor(nn.Module):
    """Q_c: inner IK-inspired iterations for one kinematic chain of K joints.

    forward(features (B,2048), betas (B,10), theta (B,3K), root (B,12) or None) -> theta (B,3K)
    """

    def __init__(self, num_joints: int, conditioned_on_root: bool, inner_iterations: int = 4,
                 embed_dim: int = EMBED_DIM):
        super().__init__()
        self.num_joints = num_joints
        self.conditioned_on_root = conditioned_on_root
        self.inner_iterations = inner_iterations
        in_dim = FEATURE_DIM + 10 + 3 * num_joints + (ROOT_DIM if conditioned_on_root else 0)
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(inplace=True),
                                   nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True))
        # forward_layers[i] predicts joint i after joints 0..i-1; backward_layers[k] predicts joint K-1-k
        # after joints K-1..K-k: both take psi plus the residuals of the k joints already visited.
        self.forward_layers = nn.ModuleList(_small_linear(embed_dim + 3 * k, 3) for k in range(num_joints))
        self.backward_layers = nn.ModuleList(_small_linear(embed_dim + 3 * k, 3) for k in range(num_joints))

    def forward(self, features, betas, theta, root=None):
        for step in range(self.inner_iterations):
            inputs = [features, betas, theta] + ([root] if self.conditioned_on_root else [])
            psi = self.embed(torch.cat(inputs, dim=-1))
            backward = step % 2 == 1
            layers = self.backward_layers if backward else self.forward_layers
            order = range(self.num_joints - 1, -1, -1) if backward else range(self.num_joints)
            visited: list[torch.Tensor] = []
            deltas = [None] * self.num_joints
            for k, joint in enumerate(order):
                # most recent residual first, as in Eq. 1: [psi, d_{i-1}, d_{i-2}, ..., d_0]
                deltas[joint] = layers[k](torch.cat([psi] + visited[::-1], dim=-1))
                visited.append(deltas[joint])
            theta = theta + torch.cat(deltas, dim=-1)
        return theta


class HKMR(ZooModel):
    """Hierarchical kinematic regressor on ResNet-50. ``regress(images)`` -> rotmat, betas, cam, extras.

    extras: pose_aa (B,72) final axis-angle pose; per outer iteration (T = outer_iterations):
    pose_aa_iters (B,T,72), rotmat_iters (B,T,24,3,3), betas_iters (B,T,10), cam_iters (B,T,3).
    """

    name = "hkmr"
    input_size = 224

    def __init__(self, mean_params: dict, outer_iterations: int = 3, inner_iterations: int = 4):
        super().__init__()
        self.outer_iterations = outer_iterations
        self.encoder = build_encoder()
        self.chains = nn.ModuleDict({
            name: ChainRegressor(len(joints), conditioned_on_root=(name != "root"),
                                 inner_iterations=inner_iterations)
            for name, joints in CHAINS})
        self.shape_net = nn.Sequential(nn.Linear(FEATURE_DIM + 10 + 72, HIDDEN_DIM), nn.ReLU(inplace=True),
                                       _small_linear(HIDDEN_DIM, 10))
        self.cam_net = nn.Sequential(nn.Linear(FEATURE_DIM + 72 + 10 + 3, HIDDEN_DIM), nn.ReLU(inplace=True),
                                     _small_linear(HIDDEN_DIM, 3))
        pose6d = torch.as_tensor(np.asarray(mean_params["pose"]), dtype=torch.float64).reshape(24, 6)
        self.register_buffer("init_pose", rot6d_to_axis_angle(pose6d).reshape(1, 72).float())
        self.register_buffer("init_shape", torch.as_tensor(np.asarray(mean_params["shape"]),
                                                           dtype=torch.float32).reshape(1, 10))
        self.register_buffer("init_cam", torch.as_tensor(np.asarray(mean_params["cam"]),
                                                         dtype=torch.float32).reshape(1, 3))
        index = torch.tensor([j for _, joints in CHAINS for j in joints])
        # chain-ordered 3-vectors -> SMPL joint order
        self.register_buffer("_smpl_order", torch.argsort(index), persistent=False)
        self.register_buffer("_chain_order", index, persistent=False)

    def regress(self, images: torch.Tensor):
        return self.regress_from_features(self.encoder(images).mean(dim=(2, 3)))

    def regress_from_features(self, features: torch.Tensor):
        """Pooled features (B,2048) -> (rotmat (B,24,3,3), betas (B,10), cam (B,3), extras)."""
        from occbench.rotations import axis_angle_to_rotmat

        b = features.shape[0]
        pose = self.init_pose.expand(b, -1).view(b, 24, 3)
        thetas = {name: pose[:, list(joints)].reshape(b, -1) for name, joints in CHAINS}
        betas = self.init_shape.expand(b, -1)
        cam = self.init_cam.expand(b, -1)
        iters = {"pose_aa_iters": [], "betas_iters": [], "cam_iters": []}
        for _ in range(self.outer_iterations):
            root = self.chains["root"](features, betas, thetas["root"])
            thetas = {name: (root if name == "root" else self.chains[name](features, betas, thetas[name], root))
                      for name, _ in CHAINS}
            pose_aa = self._to_smpl_order(thetas)
            betas = betas + self.shape_net(torch.cat([features, betas, pose_aa], -1))
            cam = cam + self.cam_net(torch.cat([features, pose_aa, betas, cam], -1))
            iters["pose_aa_iters"].append(pose_aa)
            iters["betas_iters"].append(betas)
            iters["cam_iters"].append(cam)
        extras = {k: torch.stack(v, 1) for k, v in iters.items()}
        t = self.outer_iterations
        extras["rotmat_iters"] = axis_angle_to_rotmat(extras["pose_aa_iters"].reshape(-1, 3)).view(b, t, 24, 3, 3)
        extras["pose_aa"] = pose_aa
        return extras["rotmat_iters"][:, -1], betas, cam, extras

    def training_losses(self, body, rotmat, betas, cam, extras, batch, *, weights: dict, use_part_loss: bool,
                        pelvis: str = "h36m-root") -> dict:
        """The paper's loss over every outer iteration (:func:`compute_losses`, from ``extras``) on the
        batch's SMPL targets; PARE's ``weights``, the part loss and ``pelvis`` do not apply."""
        target = {"rotmat": batch.rotmat, "betas": batch.betas, "joints3d": batch.smpl_joints,
                  "joints2d": batch.smpl_joints2d}
        return compute_losses(extras, target, body)

    def _to_smpl_order(self, thetas: dict) -> torch.Tensor:
        chain_ordered = torch.cat([thetas[name] for name, _ in CHAINS], -1).view(-1, 24, 3)
        return chain_ordered[:, self._smpl_order].reshape(-1, 72)


def rot6d_to_axis_angle(x: torch.Tensor) -> torch.Tensor:
    """(N,6) 6D rotations (SPIN convention) -> (N,3) axis-angle."""
    from occbench.rotations import rot6d_to_rotmat, rotmat_to_axis_angle
    return rotmat_to_axis_angle(rot6d_to_rotmat(x))


def build(mean_params: dict | None = None, **options) -> HKMR:
    """Random-weight HKMR. mean_params None -> occbench.body.load_mean_params()."""
    if mean_params is None:
        from occbench.body import load_mean_params
        mean_params = load_mean_params()
    return HKMR(mean_params, **options)


def compute_losses(extras: dict, target: dict, body_model, weights: dict | None = None,
                   iteration_weights=None) -> dict:
    """Paper Eq. 3 summed over the outer iterations (VAE prior term not included).

    target: rotmat (B,24,3,3), betas (B,10), joints3d (B,24,3) pelvis-relative SMPL joints [m],
    joints2d (B,24,2) crop px. L_3D and L_2D are L1 (per joint, summed over joints as in the paper, then
    averaged over the batch; 2D in normalised crop units, the weak-perspective s Pi(X) + t of the paper);
    L_smpl is squared L2 on rotation matrices and betas. The paper gives no weights: defaults are 1, with
    0.001 on betas (SPIN's). iteration_weights: (T,) weights of the outer iterations, default all 1 (Eq. 3).
    """
    w = {"3d": 1.0, "2d": 1.0, "pose": 1.0, "betas": 0.001, **(weights or {})}
    b, t = extras["betas_iters"].shape[:2]
    rotmat = extras["rotmat_iters"].flatten(0, 1)
    betas = extras["betas_iters"].flatten(0, 1)
    cam = extras["cam_iters"].flatten(0, 1)
    rep = {k: target[k][:, None].expand(b, t, *target[k].shape[1:]).flatten(0, 1)
           for k in ("rotmat", "betas", "joints3d", "joints2d")}
    it_w = torch.ones(t) if iteration_weights is None else torch.as_tensor(iteration_weights, dtype=torch.float32)
    if it_w.shape != (t,):
        raise ValueError(f"iteration_weights must have {t} values, got {tuple(it_w.shape)}")
    it_w = it_w.to(betas.device)[None, :].expand(b, t).flatten() / b    # sum over iterations, mean over batch
    out = body_model(rotmat=rotmat, betas=betas)
    joints = out.joints_smpl - out.joints_smpl[:, :1]
    proj = cam[:, None, :1] * (out.joints_smpl[..., :2] + cam[:, None, 1:])   # s Pi(X) + t, in [-1, 1] units
    per_sample = {
        "3d": w["3d"] * (joints - rep["joints3d"]).abs().sum(-1).sum(-1),
        "2d": w["2d"] * (proj - (rep["joints2d"] / 112.0 - 1.0)).abs().sum(-1).sum(-1),
        "smpl": (w["pose"] * (rotmat - rep["rotmat"]).pow(2).sum((-1, -2, -3))
                 + w["betas"] * (betas - rep["betas"]).pow(2).sum(-1)),
    }
    terms = {k: (v * it_w).sum() for k, v in per_sample.items()}
    terms["total"] = sum(terms.values())
    return terms

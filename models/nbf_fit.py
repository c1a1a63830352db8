"""Test-time fitting of 3DNBF's Neural Body Volumes (paper Sec. 3.3-3.6; official
``NeuralSMPLFittingVoGE`` and ``run_registration_test_voge`` of edz-o/3DNBF), in pure PyTorch.

Model. ``K`` isotropic Gaussian kernels sit on a subset of the body's vertices (858 in the release: the
official ``sample_data_8-2021-04-05.npz`` ``indices`` when the user has the file, else a deterministic
farthest-point subset of the body's rest-pose vertices, recorded). Each kernel belongs to one of 9 limbs
(torso, upper/lower arms, thighs, calves; from the body's skinning) and has 3 features, one per limb
orientation bin relative to the camera axis (``feature_bank.memory``): "sideways" (|l_z| < 0.3), "away"
(l_z > 0.3), "towards" (l_z < -0.3), soft with sharpness ``theta`` = 10 as in the official
``get_vert_orient_weights``. The kernel's feature is the expectation over bins (paper Sec. 3.4), the
volume is rendered with :func:`occbench.models.nbf_render.render_gaussians` to the (B,128,h,w) feature
map grid with the SPIN camera (f = 5000 px at 224, scaled to the map).

Likelihood per pixel (official ``likelihood_loss`` / ``soft_loss_fun``), with unit observed features ``f``,
object score ``s_o = <normalize(F), f>``, clutter score ``s_c = <b, f>`` (``b`` the normalised mean of the
clutter rows of the bank) mapped to [0, 1] by ``0.5 s + 0.5``, and the rendered opacity ``O``:

- ``robust`` (occlusion model, paper Eq. 3; official AdvOcc configs ``disable_occ=False``):
  ``O * softmax_max(s_o, s_c; t=0.1) + (1 - O) * s_c``: a covered pixel that the clutter model explains
  better than the body (an occluder) costs nothing more than background;
- ``plain`` (official ``disable_occ=True``): ``O * s_o + (1 - O) * s_c``;
- ``l2``: ``-|f - (F + (1 - O) b)|^2 / 4``, the plain Gaussian (L2) feature reconstruction, kept as the
  non-robust baseline the tests compare against.

The loss is ``1 - mean over pixels``, per image. Priors (documented stand-ins, VPoser is optional in the
release and not shipped): ``pose_prior_weight * sum(theta_body^2)`` (zero-mean Gaussian on the 21 body
joints' axis-angles, in place of VPoser's ``|z|^2`` with its weight 5e-4) and
``angle_prior_weight * sum((exp(relu(s * theta)) - 1)^2)`` on elbows (y) and knees (x) bending the
unnatural way (SMPLify's signs). Optional 2D keypoint term on LSP-14 joints (GMoF, sigma 100 feature-map px,
weight 1e-2 as the official ``keypoints2d_loss``); off when no detections are given (recorded).

Schedule (official step2/AdvOcc configs): Adam(lr 0.02, betas (0.9, 0.99)); stage 1: 40 steps on global
orientation + translation; stage 2: 80 steps on global orientation + body pose; betas fixed; after each
stage every image keeps its lowest-loss iterate. 180-degree hypothesis: the initial pose rotated 180 degrees
about the camera y axis and mirrored (official ``rotate_aroundy`` + ``_flip_smpl_pose_batch``);
``flip="both"`` fits both and keeps the better (official ``optimize_twoside=True`` in the AdvOcc configs),
``"select"`` fits only the better start, ``"off"`` ignores it. The result is the lowest-loss candidate among
the starts and the fits. Betas with any |beta| > 3 are reset to 0 as in the official code.
Everything is batched: images, occluded copies and hypotheses share one optimisation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from occbench.camera import FOCAL_LENGTH, CROP_SIZE
from occbench.models.nbf import NBFRegressor, NUM_KERNELS
from occbench.models.nbf_render import DEFAULT_OPTICAL_DEPTH, PinholeCamera, render_gaussians
from occbench.rotations import axis_angle_to_rotmat, rotmat_to_axis_angle

OFFICIAL_SUBSET_FILE = "sample_data_8-2021-04-05.npz"  # data/sample_params/uniform/ in the 3DNBF data release
LIMB_NAMES = ("torso", "left_lower_arm", "left_upper_arm", "left_thigh", "left_calf",
              "right_lower_arm", "right_upper_arm", "right_thigh", "right_calf")  # official nemo_part_list
# (start, end) SMPL joints of each limb's orientation vector; torso: pelvis -> neck (paper Sec. 3.7)
LIMB_JOINTS = ((0, 12), (18, 20), (16, 18), (1, 4), (4, 7), (19, 21), (17, 19), (2, 5), (5, 8))
# SMPL joint whose skinning moves a vertex -> limb index (joints not listed belong to the torso)
JOINT_TO_LIMB = {1: 3, 4: 4, 7: 4, 10: 4, 2: 7, 5: 8, 8: 8, 11: 8,
                 16: 2, 18: 1, 20: 1, 22: 1, 17: 6, 19: 5, 21: 5, 23: 5}
SMPL_FLIP_PERM = (0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12, 14, 13, 15, 17, 16, 19, 18, 21, 20, 23, 22)
FITTED_JOINTS = tuple(range(1, 22))  # body joints optimised in stage 2 (hands stay at the initial value)
# SMPLify angle prior: (joint, axis component, sign whose positive side is the unnatural bend)
ANGLE_PRIOR = ((18, 1, 1.0), (19, 1, -1.0), (4, 0, -1.0), (5, 0, -1.0))


@dataclass
class FitOptions:
    """All fitting settings; every result records them (``asdict``)."""

    stage1_steps: int = 40
    stage2_steps: int = 80
    lr: float = 0.02
    adam_betas: tuple = (0.9, 0.99)
    likelihood: str = "robust"          # "robust" | "plain" | "l2"
    softmax_temperature: float = 0.1
    flip: str = "both"                  # "both" | "select" | "off"
    pose_prior_weight: float = 5e-4
    angle_prior_weight: float = 0.1
    keypoint_weight: float = 1e-2
    keypoint_sigma: float = 100.0
    theta: float = 10.0                 # sharpness of the orientation bins
    orient_threshold: float = 0.3
    num_kernels: int = NUM_KERNELS
    kernel_sigma: float | None = None   # metres; None: 0.5 x mean nearest-neighbour kernel spacing
    optical_depth: float = DEFAULT_OPTICAL_DEPTH
    max_kernels_per_pixel: int = 16
    focal_length: float = FOCAL_LENGTH
    reset_extreme_betas: bool = True
    vposer: bool = False                # VPoser prior: not available in occbench (see module docstring)

    def __post_init__(self):
        if self.likelihood not in ("robust", "plain", "l2"):
            raise ValueError(f"likelihood must be 'robust', 'plain' or 'l2', not {self.likelihood!r}")
        if self.flip not in ("both", "select", "off"):
            raise ValueError(f"flip must be 'both', 'select' or 'off', not {self.flip!r}")
        if self.vposer:
            raise ValueError("vposer=True: the VPoser prior is not available in occbench; the fit uses the "
                             "documented Gaussian pose prior (pose_prior_weight) instead")
        self.adam_betas = tuple(self.adam_betas)


@dataclass
class NeuralBodyVolume:
    """The fitted generative model.

    vertex_index: (K,) body vertices carrying the kernels; limb: (K,) int in 0..8; sigma: kernel std (m);
    features: (K,3,C) unit features per orientation bin; clutter: (C,) unit clutter feature;
    provenance: how the subset and sigma were chosen.
    """

    vertex_index: torch.Tensor
    limb: torch.Tensor
    sigma: float
    features: torch.Tensor
    clutter: torch.Tensor
    provenance: dict = field(default_factory=dict)

    def to(self, device) -> "NeuralBodyVolume":
        return NeuralBodyVolume(self.vertex_index.to(device), self.limb.to(device), self.sigma,
                                self.features.to(device), self.clutter.to(device), dict(self.provenance))


@dataclass
class FitResult:
    """rotmat (B,24,3,3), betas (B,10), cam (B,3) weak-perspective for the 224 crop, translation (B,3),
    loss (B,) final per-image loss, init_loss (B,), flipped (B,) bool: the chosen candidate comes from the
    180-degree hypothesis; provenance: options and flags."""

    rotmat: torch.Tensor
    betas: torch.Tensor
    cam: torch.Tensor
    translation: torch.Tensor
    loss: torch.Tensor
    init_loss: torch.Tensor
    flipped: torch.Tensor
    provenance: dict


# ----------------------------------------------------------------------------------------- the volume

def farthest_point_sampling(points: torch.Tensor, count: int, start: int = 0) -> torch.Tensor:
    """(N,3) -> (count,) indices; deterministic (starts at ``start``, ties broken by lowest index)."""
    points = points.double()
    chosen = torch.empty(count, dtype=torch.long)
    dist = torch.full((points.shape[0],), float("inf"), dtype=torch.float64)
    current = start
    for i in range(count):
        chosen[i] = current
        dist = torch.minimum(dist, ((points - points[current]) ** 2).sum(-1))
        current = int(torch.argmax(dist))
    return chosen


def find_official_subset(data_dir=None) -> Path | None:
    """The official kernel subset file in OCCBENCH_DATA_DIR (flat, or under sample_params/uniform/), or None."""
    from occbench.assets import asset_dir
    folder = asset_dir("OCCBENCH_DATA_DIR", data_dir)
    for path in (folder / OFFICIAL_SUBSET_FILE, folder / "sample_params" / "uniform" / OFFICIAL_SUBSET_FILE):
        if path.is_file():
            return path
    return None


def kernel_subset(body, num_kernels: int = NUM_KERNELS, data_dir=None) -> tuple[torch.Tensor, dict]:
    """(K,) vertex indices and a provenance dict. The official file is used for a real SMPL body when the
    user has it (and K = 858); otherwise farthest-point sampling of the rest-pose vertices from vertex 0."""
    path = find_official_subset(data_dir) if num_kernels == NUM_KERNELS else None
    if path is not None and not getattr(body, "is_standin", False):
        with np.load(path) as data:
            if "indices" not in data:
                from occbench.errors import UserError
                raise UserError(f"{path}: no 'indices' array; expected 3DNBF's {OFFICIAL_SUBSET_FILE} "
                                f"(data/sample_params/uniform/ of the 3DNBF data release)")
            indices = torch.as_tensor(np.asarray(data["indices"]), dtype=torch.long)
        return indices, {"kernel_subset": "official", "kernel_subset_file": str(path)}
    rest = rest_vertices(body)
    indices = farthest_point_sampling(rest, num_kernels)
    reason = "stand-in body" if getattr(body, "is_standin", False) else \
        (f"{OFFICIAL_SUBSET_FILE} not found in OCCBENCH_DATA_DIR" if num_kernels == NUM_KERNELS
         else f"num_kernels={num_kernels}")
    return indices, {"kernel_subset": "farthest-point", "kernel_subset_reason": reason,
                     "kernel_subset_start": 0}


@torch.no_grad()
def rest_vertices(body) -> torch.Tensor:
    """(6890,3) vertices of the mean shape in the rest pose."""
    device = body.device
    eye = torch.eye(3, device=device).expand(1, 24, 3, 3)
    return body(rotmat=eye, betas=torch.zeros(1, 10, device=device)).vertices[0].cpu()


def kernel_limbs(body, vertex_index: torch.Tensor) -> torch.Tensor:
    """(K,) limb index of each kernel from the body's per-vertex part labels (dominant skinning joint)."""
    from occbench.body import vertex_part_labels
    parts = torch.as_tensor(np.asarray(vertex_part_labels(body)), dtype=torch.long)[vertex_index.cpu()]
    lookup = torch.zeros(24, dtype=torch.long)
    for joint, limb in JOINT_TO_LIMB.items():
        lookup[joint] = limb
    return lookup[parts]


def build_volume(body, kernel_features: torch.Tensor, clutter: torch.Tensor, options: FitOptions,
                 data_dir=None, vertex_index: torch.Tensor | None = None) -> NeuralBodyVolume:
    """Neural Body Volume on ``body``. kernel_features: (K_bank,3,C) from the feature bank (the first K rows
    are used when fewer kernels are asked for); clutter: (C,). vertex_index overrides the subset."""
    if vertex_index is None:
        vertex_index, provenance = kernel_subset(body, options.num_kernels, data_dir)
    else:
        provenance = {"kernel_subset": "given"}
    count = vertex_index.shape[0]
    if kernel_features.shape[0] < count:
        raise ValueError(f"feature bank has {kernel_features.shape[0]} kernels, subset has {count}")
    sigma = options.kernel_sigma
    if sigma is None:
        rest = rest_vertices(body)[vertex_index].double()
        d = torch.cdist(rest, rest)
        d.fill_diagonal_(float("inf"))
        sigma = 0.5 * float(d.min(dim=1).values.mean())
        provenance["kernel_sigma_rule"] = "0.5 x mean nearest-neighbour spacing"
    provenance.update(num_kernels=count, kernel_sigma=sigma)
    return NeuralBodyVolume(vertex_index=vertex_index.long(), limb=kernel_limbs(body, vertex_index),
                            sigma=float(sigma), features=F.normalize(kernel_features[:count], dim=-1),
                            clutter=F.normalize(clutter, dim=0), provenance=provenance)


def orientation_weights(joints: torch.Tensor, theta: float = 10.0, threshold: float = 0.3) -> torch.Tensor:
    """(B,24,3) camera-frame joints -> (B,9,3) normalised weights of the orientation bins of each limb:
    [sideways, away (+z), towards (-z)]."""
    start = joints[:, [a for a, _ in LIMB_JOINTS]]
    end = joints[:, [b for _, b in LIMB_JOINTS]]
    z = F.normalize(end - start, dim=-1)[..., 2]
    w = torch.stack([torch.sigmoid(theta * (z + threshold)) + torch.sigmoid(theta * (threshold - z)) - 1,
                     torch.sigmoid(theta * (z - threshold)),
                     torch.sigmoid(theta * (-z - threshold))], dim=-1).clamp_min(1e-6)
    return w / w.sum(-1, keepdim=True)


def render_body(volume: NeuralBodyVolume, vertices: torch.Tensor, joints: torch.Tensor,
                translation: torch.Tensor, camera: PinholeCamera, options: FitOptions):
    """Render the volume posed by ``vertices`` (B,6890,3) / ``joints`` (B,24,3) (body frame) moved by
    ``translation`` (B,3). Returns :class:`occbench.models.nbf_render.RenderOutput`."""
    return render_kernels(volume, vertices[:, volume.vertex_index] + translation[:, None], joints, camera,
                          options)


class KernelSkinning:
    """SMPL linear blend skinning of the kernel vertices only, betas fixed for the whole fit.

    Same arithmetic as the body model's forward (smplx ``lbs``) restricted to ``vertex_index``: the shaped
    rest vertices and rest joints are computed once; each step costs the 24-joint kinematic chain plus the
    pose blend shapes and skinning of K (not 6890) vertices. ``__call__(rotmat (B,24,3,3))`` ->
    (kernel vertices (B,K,3), SMPL joints (B,24,3)), body frame.
    """

    def __init__(self, body, vertex_index: torch.Tensor, betas: torch.Tensor) -> None:
        smpl = body.smpl
        dtype = smpl.v_template.dtype
        betas = betas.to(dtype)
        shaped = smpl.v_template + torch.einsum("bl,vcl->bvc", betas, smpl.shapedirs)   # (B,6890,3)
        self.rest_joints = torch.einsum("jv,bvc->bjc", smpl.J_regressor, shaped)        # (B,24,3)
        idx = vertex_index.to(shaped.device)
        self.rest_kernels = shaped[:, idx]                                              # (B,K,3)
        posedirs = smpl.posedirs.view(smpl.posedirs.shape[0], -1, 3)                     # (207,6890,3)
        self.posedirs = posedirs[:, idx].reshape(posedirs.shape[0], -1)                  # (207,K*3)
        self.weights = smpl.lbs_weights[idx]                                             # (K,24)
        self.parents = smpl.parents

    def __call__(self, rotmat: torch.Tensor):
        from smplx.lbs import batch_rigid_transform
        batch = rotmat.shape[0]
        eye = torch.eye(3, dtype=rotmat.dtype, device=rotmat.device)
        pose_feature = (rotmat[:, 1:] - eye).reshape(batch, -1)
        posed = self.rest_kernels + (pose_feature @ self.posedirs).view(batch, -1, 3)
        joints, transforms = batch_rigid_transform(rotmat, self.rest_joints, self.parents)
        t = torch.einsum("kj,bjmn->bkmn", self.weights, transforms)                      # (B,K,4,4)
        vertices = torch.einsum("bkmn,bkn->bkm", t[..., :3, :3], posed) + t[..., :3, 3]
        return vertices, joints


def render_kernels(volume: NeuralBodyVolume, centers: torch.Tensor, joints: torch.Tensor,
                   camera: PinholeCamera, options: FitOptions, dense: bool = True):
    """Render kernels at camera-frame ``centers`` (B,K,3) with orientation bins from ``joints`` (B,24,3)."""
    weights = orientation_weights(joints, options.theta, options.orient_threshold)[:, volume.limb]  # (B,K,3)
    features = torch.einsum("bko,koc->bkc", weights, volume.features)
    return render_gaussians(centers, volume.sigma, features, camera, options.optical_depth,
                            options.max_kernels_per_pixel, dense=dense)


def _soft_maximum(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    w = torch.softmax(torch.stack([a, b]) / temperature, dim=0)
    return w[0] * a + w[1] * b


@dataclass
class ObservedFeatures:
    """What the likelihood needs from an observed feature map, computed once per fit.

    unit: (B,H*W,C) L2-normalised features; clutter_score: (B,H*W) ``0.5 <b, f> + 0.5``;
    clutter_l2: (B,H*W) ``|f - b|^2 / 4`` (the l2 cost of a pixel the body does not cover).
    """

    unit: torch.Tensor
    clutter_score: torch.Tensor
    clutter_l2: torch.Tensor

    @classmethod
    def from_map(cls, observed: torch.Tensor, clutter: torch.Tensor) -> "ObservedFeatures":
        unit = F.normalize(observed, dim=1).flatten(2).transpose(1, 2)
        return cls(unit=unit, clutter_score=0.5 * (unit @ clutter) + 0.5,
                   clutter_l2=((unit - clutter) ** 2).sum(-1) / 4.0)


def likelihood_loss(rendered, observed: ObservedFeatures, clutter: torch.Tensor, options: FitOptions) -> torch.Tensor:
    """Per-image loss (B,): 1 - the mean pixel score (see the module docstring).

    rendered: RenderOutput (its non-empty rays are used: an empty pixel scores its clutter score, or costs
    ``clutter_l2`` for ``l2``, whatever the pose, so it enters as a constant); observed: ObservedFeatures.
    """
    img, pix = rendered.ray_image, rendered.ray_pixel
    f = observed.unit[img, pix]                                                          # (N,C)
    opacity, feats = rendered.ray_opacity, rendered.ray_features
    batch, num_pixels = observed.clutter_score.shape
    if options.likelihood == "l2":
        base = -observed.clutter_l2.mean(1)
        composite = feats + (1 - opacity)[:, None] * clutter
        delta = -((f - composite) ** 2).sum(-1) / 4.0 + observed.clutter_l2[img, pix]
    else:
        base = observed.clutter_score.mean(1)
        s_clu = observed.clutter_score[img, pix]
        s_obj = (0.5 * (F.normalize(feats, dim=-1) * f).sum(-1) + 0.5).clamp(1e-8, 1.0)
        if options.likelihood == "robust":
            s_obj = _soft_maximum(s_obj, s_clu, options.softmax_temperature)
        delta = opacity * (s_obj - s_clu)
    score = base + base.new_zeros(batch).index_add(0, img, delta) / num_pixels
    return 1.0 - score


def pose_prior(body_aa: torch.Tensor, options: FitOptions) -> torch.Tensor:
    """body_aa: (B,23,3) axis-angles of joints 1..23 -> (B,)."""
    gaussian = (body_aa[:, : len(FITTED_JOINTS)] ** 2).sum((1, 2))
    angle = body_aa.new_zeros(body_aa.shape[0])
    for joint, axis, sign in ANGLE_PRIOR:
        angle = angle + torch.expm1(F.relu(sign * body_aa[:, joint - 1, axis])) ** 2
    return options.pose_prior_weight * gaussian + options.angle_prior_weight * angle


def keypoint_loss(joints_lsp: torch.Tensor, translation: torch.Tensor, keypoints2d: torch.Tensor,
                  camera: PinholeCamera, map_scale: float, options: FitOptions) -> torch.Tensor:
    """GMoF 2D keypoint term. keypoints2d: (B,14,3) [x, y, conf] in 224-crop px -> (B,)."""
    projected = camera.project(joints_lsp + translation[:, None])
    residual = projected - keypoints2d[..., :2] * map_scale
    sq = (residual ** 2).sum(-1)
    s2 = options.keypoint_sigma ** 2
    return options.keypoint_weight * (keypoints2d[..., 2] * s2 * sq / (s2 + sq)).sum(-1)


# ----------------------------------------------------------------------------------------- hypotheses

def flip_hypothesis(rotmat: torch.Tensor) -> torch.Tensor:
    """(B,24,3,3) -> the pose rotated 180 degrees about the camera y axis and mirrored left-right
    (joints swapped, each rotation conjugated by the x reflection)."""
    mirror = torch.diag(rotmat.new_tensor([-1.0, 1.0, 1.0]))
    turn = torch.diag(rotmat.new_tensor([-1.0, 1.0, -1.0]))
    rotated = rotmat.clone()
    rotated[:, 0] = turn @ rotmat[:, 0]
    swapped = rotated[:, list(SMPL_FLIP_PERM)]
    return mirror @ swapped @ mirror


def weak_perspective_from_translation(translation: torch.Tensor, focal_length: float = FOCAL_LENGTH,
                                      crop_size: int = CROP_SIZE) -> torch.Tensor:
    """(B,3) [tx, ty, tz] -> (B,3) [s, tx, ty] with s = 2 f / (crop_size tz) (inverse of the SPIN rule)."""
    tz = translation[:, 2].clamp_min(1e-6)
    return torch.stack([2.0 * focal_length / (crop_size * tz), translation[:, 0], translation[:, 1]], dim=-1)


# ----------------------------------------------------------------------------------------- fitting

class _Problem:
    """Loss of a batch of pose hypotheses against their feature maps."""

    def __init__(self, body, volume, feature_map, betas, keypoints2d, options: FitOptions):
        self.body, self.volume, self.options = body, volume, options
        self.feature_map, self.betas, self.keypoints2d = feature_map, betas, keypoints2d
        height = feature_map.shape[-1]
        self.camera = PinholeCamera.for_crop(height, options.focal_length, CROP_SIZE)
        self.map_scale = height / CROP_SIZE
        self.skinning = KernelSkinning(body, volume.vertex_index, betas)
        self.observed = ObservedFeatures.from_map(feature_map, volume.clutter)

    def __call__(self, global_aa, body_aa, translation) -> torch.Tensor:
        aa = torch.cat([global_aa[:, None], body_aa], dim=1)                              # (B,24,3)
        rotmat = axis_angle_to_rotmat(aa).view(aa.shape[0], 24, 3, 3)
        kernels, joints = self.skinning(rotmat)
        rendered = render_kernels(self.volume, kernels + translation[:, None], joints, self.camera, self.options,
                                  dense=False)
        loss = likelihood_loss(rendered, self.observed, self.volume.clutter, self.options)
        loss = loss + pose_prior(body_aa, self.options)
        if self.keypoints2d is not None:
            joints_lsp = self.body(rotmat=rotmat, betas=self.betas).joints_lsp
            loss = loss + keypoint_loss(joints_lsp, translation, self.keypoints2d, self.camera,
                                        self.map_scale, self.options)
        return loss


def _run_stage(problem: _Problem, params: dict, fit_names: tuple, steps: int, options: FitOptions) -> torch.Tensor:
    """Adam on ``fit_names`` of ``params`` (dict of (B,...) tensors, updated in place to each image's
    lowest-loss iterate). Returns that lowest loss (B,)."""
    if steps <= 0:
        with torch.no_grad():
            return problem(**params)
    variables = {k: v.detach().clone().requires_grad_(k in fit_names) for k, v in params.items()}
    optimizer = torch.optim.Adam([variables[k] for k in fit_names], lr=options.lr, betas=options.adam_betas)
    best = {k: v.detach().clone() for k, v in params.items()}
    best_loss = None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = problem(**variables)
        with torch.no_grad():
            if best_loss is None:
                best_loss = loss.detach().clone()
                better = torch.ones_like(best_loss, dtype=torch.bool)
            else:
                better = loss < best_loss
                best_loss = torch.where(better, loss.detach(), best_loss)
            for k in params:
                mask = better.view(-1, *[1] * (best[k].dim() - 1))
                best[k] = torch.where(mask, variables[k].detach(), best[k])
        loss.sum().backward()
        optimizer.step()
    params.update(best)
    return best_loss


def fit(body, volume: NeuralBodyVolume, feature_map: torch.Tensor, rotmat: torch.Tensor, betas: torch.Tensor,
        cam: torch.Tensor, options: FitOptions | None = None, keypoints2d: torch.Tensor | None = None) -> FitResult:
    """Fit the Neural Body Volume to feature maps, starting from a regressor's estimate.

    feature_map: (B,C,h,w) observed features (the crop's 224 px span the map); rotmat (B,24,3,3),
    betas (B,10), cam (B,3) weak-perspective for the 224 crop: the initialisation;
    keypoints2d: optional (B,14,3) LSP-14 detections [x, y, conf] in 224-crop px.
    """
    from occbench.camera import weak_perspective_to_translation

    options = options or FitOptions()
    batch = rotmat.shape[0]
    betas = betas.detach().clone()
    if options.reset_extreme_betas:
        betas[(betas.abs() > 3).any(dim=-1)] = 0.0
    translation = weak_perspective_to_translation(cam.detach(), options.focal_length, CROP_SIZE)
    starts = [rotmat.detach()]
    if options.flip != "off":
        starts.append(flip_hypothesis(rotmat.detach()))
    hyps = len(starts)
    rot_all = torch.cat(starts)
    aa = rotmat_to_axis_angle(rot_all).view(hyps * batch, 24, 3)
    params = {"global_aa": aa[:, 0].clone(), "body_aa": aa[:, 1:].clone(), "translation": translation.repeat(hyps, 1)}
    kp = keypoints2d.repeat(hyps, 1, 1) if keypoints2d is not None else None
    problem = _Problem(body, volume, feature_map.detach().repeat(hyps, 1, 1, 1), betas.repeat(hyps, 1), kp, options)
    with torch.no_grad():
        start_loss = problem(**params)                                                  # (hyps*B,)

    fit_rows = torch.arange(hyps * batch, device=rotmat.device)
    if options.flip == "select":
        use_flip = start_loss[batch:] < start_loss[:batch]
        fit_rows = torch.arange(batch, device=rotmat.device) + batch * use_flip.long()
    sub = {k: v[fit_rows] for k, v in params.items()}
    sub_problem = _Problem(body, volume, problem.feature_map[fit_rows], problem.betas[fit_rows],
                           kp[fit_rows] if kp is not None else None, options)
    with torch.enable_grad():
        _run_stage(sub_problem, sub, ("global_aa", "translation"), options.stage1_steps, options)
        _run_stage(sub_problem, sub, ("global_aa", "body_aa"), options.stage2_steps, options)
    with torch.no_grad():
        fitted_loss = sub_problem(**sub)

    # candidates: every start and every fit; each image keeps the lowest loss
    cand_params = {k: torch.cat([params[k], sub[k]]) for k in params}
    cand_loss = torch.cat([start_loss, fitted_loss])
    cand_image = torch.cat([torch.arange(hyps * batch, device=rotmat.device) % batch, fit_rows % batch])
    cand_flip = torch.cat([torch.arange(hyps * batch, device=rotmat.device) >= batch, fit_rows >= batch])
    best_idx = torch.empty(batch, dtype=torch.long, device=rotmat.device)
    for i in range(batch):
        rows = (cand_image == i).nonzero().squeeze(1)
        best_idx[i] = rows[cand_loss[rows].argmin()]
    aa_best = torch.cat([cand_params["global_aa"][best_idx][:, None], cand_params["body_aa"][best_idx]], dim=1)
    rot_best = axis_angle_to_rotmat(aa_best).view(batch, 24, 3, 3)
    trans_best = cand_params["translation"][best_idx]
    provenance = {"fit_options": asdict(options), "keypoint_term": keypoints2d is not None,
                  "keypoint_term_reason": None if keypoints2d is not None else "no 2D detections given",
                  "pose_prior": "gaussian axis-angle + SMPLify angle prior (VPoser not available)",
                  **volume.provenance}
    return FitResult(rotmat=rot_best.detach(), betas=betas, translation=trans_best.detach(),
                     cam=weak_perspective_from_translation(trans_best.detach(), options.focal_length),
                     loss=cand_loss[best_idx].detach(), init_loss=start_loss[:batch].detach(),
                     flipped=cand_flip[best_idx], provenance=provenance)


# ----------------------------------------------------------------------------------------- zoo model

class NBFFitter(NBFRegressor):
    """``3dnbf``: the regressor's estimate refined by fitting the Neural Body Volume to its feature map.

    Same state dict as ``3dnbf-reg``. ``regress`` returns the fitted parameters; extras hold the regressor's
    own estimate (``reg_rotmat``, ``reg_betas``, ``reg_cam``), ``fit_loss``, ``fit_init_loss``,
    ``fit_flipped`` and the feature map. ``fit_provenance`` records the options and the kernel subset.
    """

    name = "3dnbf"
    needs_grad = True   # engines must not run predict under torch.inference_mode: the fit uses autograd

    def __init__(self, mean_params=None, input_size: int = 320, options: FitOptions | None = None,
                 data_dir=None) -> None:
        super().__init__(mean_params, input_size)
        self.fit_options = options or FitOptions()
        self.data_dir = data_dir
        self.__dict__["_volume"] = None
        self.fit_provenance: dict = {}

    def volume(self) -> NeuralBodyVolume:
        """The Neural Body Volume of the attached body and the loaded feature bank (built once)."""
        if self.body_model is None:
            raise RuntimeError("3dnbf: no body model attached; use occbench.load_model(...)")
        vol = self.__dict__["_volume"]
        bank = self.feature_bank
        if vol is None or vol.features.device != bank.memory.device or self.__dict__.get("_bank_version") != \
                bank.memory._version:
            vol = build_volume(self.body_model, bank.kernel_features(), bank.clutter_feature(),
                               self.fit_options, self.data_dir)
            self.__dict__["_volume"] = vol.to(bank.memory.device)
            self.__dict__["_bank_version"] = bank.memory._version
        return self.__dict__["_volume"]

    @property
    def provenance(self) -> dict:
        """What ``load_model`` recorded, plus ``fit``: the fitting options and the Neural Body Volume
        (kernel subset, sigma) once a body model is attached; run directories store it."""
        base = dict(self.__dict__.get("_provenance", {}))
        fit_info = {"options": asdict(self.fit_options), "vposer": False,
                    "pose_prior": "gaussian axis-angle + SMPLify angle prior (VPoser not available)",
                    "keypoint_term": "off unless 2D detections are passed to regress()"}
        if self.body_model is not None:
            fit_info.update(self.volume().provenance)
        base["fit"] = fit_info
        return base

    @provenance.setter
    def provenance(self, value: dict) -> None:
        self.__dict__["_provenance"] = dict(value)

    def regress(self, images: torch.Tensor, keypoints2d: torch.Tensor | None = None):
        with torch.no_grad():
            rotmat, betas, cam, extras = super().regress(images)
        with torch.autocast(device_type=images.device.type, enabled=False):   # the fit runs in fp32
            result = fit(self.body_model, self.volume(), extras["feature_map"].float(), rotmat.float(),
                         betas.float(), cam.float(), self.fit_options, keypoints2d)
        self.fit_provenance = result.provenance
        extras.update(reg_rotmat=rotmat, reg_betas=betas, reg_cam=cam, fit_loss=result.loss,
                      fit_init_loss=result.init_loss, fit_flipped=result.flipped)
        return result.rotmat, result.betas, result.cam, extras

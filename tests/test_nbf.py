"""3DNBF: regressor layout and loading, training signal, Neural Body Volume fitting (stand-in body)."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import model_layout_from_manifest, random_state_dict_from_manifest, save_in_official_container
from occbench.body import load_body_model, load_mean_params
from occbench.checkpoints import manifest_path
from occbench.camera import weak_perspective_to_translation
from occbench.models import get_entry
from occbench.models import nbf_fit as NF
from occbench.models.nbf import NUM_KERNELS, build_regressor
from occbench.models.nbf_render import PinholeCamera
from occbench.rotations import axis_angle_to_rotmat, rot6d_to_rotmat


@pytest.fixture(scope="module")
def body():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                         # the stand-in body's one-time notice
        return load_body_model()


@pytest.fixture(scope="module")
def random_state():
    return random_state_dict_from_manifest(manifest_path("3dnbf_r50.tsv"), seed=1)


# ------------------------------------------------------------------------------------------ regressor

def test_state_dict_matches_official_manifest():
    entry = get_entry("3dnbf-reg")
    expected = model_layout_from_manifest(manifest_path("3dnbf_r50.tsv"), entry.strip_prefixes, entry.known_unused)
    model = build_regressor(load_mean_params())
    state = model.state_dict()
    assert [k for k, _, _ in expected] == list(state)                       # same keys, same order
    for key, shape, dtype in expected:
        assert tuple(state[key].shape) == shape, key
        assert str(state[key].dtype) == f"torch.{dtype}", key
    assert state["feature_bank.memory"].shape == (NUM_KERNELS * 3 + 2160, 128)
    assert get_entry("3dnbf").manifest == entry.manifest


def test_mmcv_checkpoint_loads_strictly_and_predicts(tmp_path, random_state):
    from occbench.zoo import load_model
    state = random_state
    path = save_in_official_container(state, tmp_path / "3dnbf_r50.pth", container="mmcv")
    model = load_model("3dnbf-reg", checkpoint=path, device="cpu")
    assert model.provenance["checkpoint_sha256"]
    loaded = model.state_dict()
    assert torch.equal(loaded["feature_bank.memory"], state["feature_bank.memory"])
    assert torch.equal(loaded["feature_bank.accumulate_num"], state["feature_bank.accumulate_num"])
    assert torch.equal(loaded["head.pose_mlp.weight"], state["head.pose_mlp.weight"])
    with torch.no_grad():
        pred = model.predict(torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert pred.rotmat.shape == (1, 24, 3, 3) and pred.betas.shape == (1, 10) and pred.cam.shape == (1, 3)
    assert pred.vertices.shape == (1, 6890, 3) and pred.joints_lsp.shape == (1, 14, 3)
    assert pred.extras["feature_map"].shape == (1, 128, 80, 80)            # stride 4 at 320 px
    assert pred.extras["part_maps"].shape == (1, 25, 80, 80)
    for value in (pred.rotmat, pred.betas, pred.cam, pred.vertices, pred.extras["feature_map"]):
        assert torch.isfinite(value).all()


def test_missing_key_is_reported(tmp_path, random_state):
    from occbench.errors import UserError
    from occbench.zoo import load_model
    state = {k: v for k, v in random_state.items() if k != "feature_bank.memory"}
    path = save_in_official_container(state, tmp_path / "broken.pth", container="mmcv")
    with pytest.raises(UserError, match="feature_bank.memory"):
        load_model("3dnbf-reg", checkpoint=path, device="cpu")


def test_training_signal(body):
    """The head is wired right: trained from random init on 4 demo samples, the loss on 3D joints and
    SMPL parameters falls by a large factor. Backbone and the first three decoder blocks are frozen and run
    once (their cost on 2 CPU cores would dominate); upsample3 and the whole PARE-style head train."""
    from smplx.lbs import batch_rigid_transform

    from occbench.data import open_dataset
    torch.manual_seed(0)
    dataset = open_dataset("demo", limit=4)
    samples = [dataset[i] for i in range(4)]
    crops = torch.stack([torch.from_numpy(s.crop).permute(2, 0, 1).float() / 255 for s in samples])
    pose = torch.stack([torch.as_tensor(np.asarray(s.pose), dtype=torch.float32) for s in samples])
    betas = torch.stack([torch.as_tensor(np.asarray(s.betas), dtype=torch.float32) for s in samples])
    target_rot = axis_angle_to_rotmat(pose.reshape(-1, 3)).view(4, 24, 3, 3)
    smpl = body.smpl
    rest = torch.einsum("jv,bvc->bjc", smpl.J_regressor,
                        smpl.v_template + torch.einsum("vck,bk->bvc", smpl.shapedirs, betas))

    def joints(rotmat):                                     # SMPL forward kinematics, root-relative
        j, _ = batch_rigid_transform(rotmat, rest, smpl.parents)
        return j - j[:, :1]

    target_joints = joints(target_rot)
    model = build_regressor(load_mean_params(), input_size=32).eval()
    head, decoder = model.head, model.head.upsample_layers
    with torch.no_grad():
        stages = model.backbone.forward_stages(model.preprocess(crops))
        coarse = decoder.upsample2(decoder.upsample1(decoder.upsample0(stages["layer4"]), stages["layer3"]),
                                   stages["layer2"])
    trained = [decoder.upsample3, head.keypoint_final_layer, head.smpl_final_layer, head.pose_mlp,
               head.shape_mlp, head.cam_mlp]
    optimizer = torch.optim.Adam([p for m in trained for p in m.parameters()], lr=6e-3)
    losses = []
    for _ in range(80):
        pose6d, pred_betas, _, _ = head.regress_from_decoder(decoder.upsample3(coarse, stages["layer1"]))
        rotmat = rot6d_to_rotmat(pose6d).view(4, 24, 3, 3)
        loss = (((rotmat - target_rot) ** 2).mean() + ((joints(rotmat) - target_joints) ** 2).sum(-1).mean()
                + 0.01 * ((pred_betas - betas) ** 2).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses


# ------------------------------------------------------------------------------------------ fitting

def test_flip_hypothesis_is_the_depth_mirror(body):
    gen = torch.Generator().manual_seed(3)
    aa = 0.3 * torch.randn(2, 24, 3, generator=gen)
    rot = axis_angle_to_rotmat(aa).view(2, 24, 3, 3)
    flipped = NF.flip_hypothesis(rot)
    assert torch.allclose(NF.flip_hypothesis(flipped), rot, atol=1e-5)          # an involution
    with torch.no_grad():
        a = body(rotmat=rot).joints_smpl
        b = body(rotmat=flipped).joints_smpl
    a, b = a - a[:, :1], b - b[:, :1]
    # rotated 180 degrees about y and mirrored = the same body reflected in depth, left/right labels
    # swapped: the same 2D joints, seen from the back
    mirrored = a[:, list(NF.SMPL_FLIP_PERM)] * torch.tensor([1.0, 1.0, -1.0])
    assert (b - mirrored).norm(dim=-1).max() < 0.02                            # stand-in is ~symmetric
    assert (b - a).norm(dim=-1).max() > 0.05


def test_kernel_subset_is_deterministic_and_recorded(body):
    idx_a, prov = NF.kernel_subset(body, 64)
    idx_b, _ = NF.kernel_subset(body, 64)
    assert torch.equal(idx_a, idx_b) and len(set(idx_a.tolist())) == 64
    assert prov["kernel_subset"] == "farthest-point" and prov["kernel_subset_reason"]
    limbs = NF.kernel_limbs(body, idx_a)
    assert set(limbs.tolist()) == set(range(9))                                 # every limb has kernels


def test_kernel_skinning_matches_the_body_model(body):
    gen = torch.Generator().manual_seed(5)
    rot = axis_angle_to_rotmat(0.4 * torch.randn(2, 24, 3, generator=gen)).view(2, 24, 3, 3)
    betas = torch.randn(2, 10, generator=gen)
    index, _ = NF.kernel_subset(body, 100)
    kernels, joints = NF.KernelSkinning(body, index, betas)(rot)
    with torch.no_grad():
        out = body(rotmat=rot, betas=betas)
    assert torch.allclose(kernels, out.vertices[:, index], atol=1e-5)
    assert torch.allclose(joints, out.joints_smpl, atol=1e-5)


def _synthetic_problem(body, occlude: bool, kernels=400, per_pixel=16, steps=(20, 40), size=32):
    """A Neural Body Volume with smooth random features, a known pose, its rendered feature map."""
    gen = torch.Generator().manual_seed(0)
    channels = 32
    options = NF.FitOptions(num_kernels=kernels, flip="off", stage1_steps=steps[0], stage2_steps=steps[1],
                            max_kernels_per_pixel=per_pixel)
    index, _ = NF.kernel_subset(body, kernels)
    rest = NF.rest_vertices(body)[index]
    # smooth over the body surface, as trained kernel features are: random Fourier features of the rest pose
    basis = torch.sin(rest @ (torch.randn(3, 64, generator=gen) / 0.25) + 6.28 * torch.rand(64, generator=gen))
    features = F.normalize(torch.einsum("kf,ofc->koc", basis, torch.randn(3, 64, channels, generator=gen)), dim=-1)
    clutter = F.normalize(torch.randn(channels, generator=gen), dim=0)
    volume = NF.build_volume(body, features, clutter, options, vertex_index=index)
    batch = 2
    aa = torch.zeros(batch, 24, 3)
    aa[:, 0] = torch.tensor([math.pi, 0.0, 0.0])                               # upright in the camera frame
    aa[:, 1:22] = 0.25 * torch.randn(batch, 21, 3, generator=gen)
    for joint, axis, sign in NF.ANGLE_PRIOR:                                   # natural elbow/knee bends
        aa[:, joint, axis] = -sign * aa[:, joint, axis].abs()
    rot = axis_angle_to_rotmat(aa).view(batch, 24, 3, 3)
    cam = torch.tensor([[0.9, 0.0, 0.1]]).repeat(batch, 1)
    betas = torch.zeros(batch, 10)
    with torch.no_grad():
        out = body(rotmat=rot, betas=betas)
        rendered = NF.render_body(volume, out.vertices, out.joints_smpl, weak_perspective_to_translation(cam),
                                  PinholeCamera.for_crop(size), options)
        fmap = rendered.features + (1 - rendered.opacity)[:, None] * clutter.view(1, -1, 1, 1)
        fmap = fmap + 0.05 * torch.randn(fmap.shape, generator=gen)
        if occlude:   # an occluder the clutter model explains over the lower-left quarter (one leg)
            fmap[:, :, size // 2:, : size // 2] = clutter.view(1, -1, 1, 1) + 0.05 * torch.randn(
                batch, channels, size - size // 2, size // 2, generator=gen)
    init = aa.clone()
    init[:, 0] += 0.1 * torch.randn(batch, 3, generator=gen)
    init[:, 1:22] += 0.15 * torch.randn(batch, 21, 3, generator=gen)
    init_rot = axis_angle_to_rotmat(init).view(batch, 24, 3, 3)
    init_cam = cam + torch.tensor([0.05, 0.03, -0.03])
    gt_joints = out.joints_smpl - out.joints_smpl[:, :1]
    return volume, fmap, init_rot, betas, init_cam, gt_joints, options


def _joint_error_mm(body, rotmat, betas, gt_joints):
    with torch.no_grad():
        j = body(rotmat=rotmat, betas=betas).joints_smpl
    return ((j - j[:, :1] - gt_joints).norm(dim=-1).mean() * 1000).item()


def test_fit_recovers_known_pose(body):
    volume, fmap, init_rot, betas, init_cam, gt, options = _synthetic_problem(body, occlude=False, steps=(15, 30))
    before = _joint_error_mm(body, init_rot, betas, gt)
    result = NF.fit(body, volume, fmap, init_rot, betas, init_cam, options)
    after = _joint_error_mm(body, result.rotmat, betas, gt)
    assert before > 90
    assert after < 60 and after < 0.5 * before, (before, after)
    assert (result.loss < result.init_loss).all()
    assert result.provenance["keypoint_term"] is False
    assert result.provenance["fit_options"]["stage2_steps"] == 30


def test_occlusion_model_succeeds_where_l2_fails(body):
    volume, fmap, init_rot, betas, init_cam, gt, options = _synthetic_problem(body, occlude=True)
    before = _joint_error_mm(body, init_rot, betas, gt)
    robust = NF.fit(body, volume, fmap, init_rot, betas, init_cam, options)
    l2_options = NF.FitOptions(**{**options.__dict__, "likelihood": "l2"})
    l2 = NF.fit(body, volume, fmap, init_rot, betas, init_cam, l2_options)
    robust_err = _joint_error_mm(body, robust.rotmat, betas, gt)
    l2_err = _joint_error_mm(body, l2.rotmat, betas, gt)
    assert robust_err < 75 and robust_err < 0.5 * before, (before, robust_err)
    assert l2_err > 1.5 * robust_err and l2_err > 75, (robust_err, l2_err)


def test_fitter_end_to_end_through_the_zoo():
    from occbench.zoo import load_model
    model = load_model("3dnbf", weights="random", device="cpu", input_size=64, num_kernels=200,
                       stage1_steps=2, stage2_steps=3, flip="both")
    assert model.fit_options.flip == "both" and model.fit_options.stage1_steps == 2
    with torch.inference_mode(False), torch.no_grad():          # fitting runs its own autograd
        pred = model.predict(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(4)))
    assert pred.rotmat.shape == (2, 24, 3, 3) and torch.isfinite(pred.vertices).all()
    assert pred.extras["feature_map"].shape == (2, 128, 16, 16)
    assert (pred.extras["fit_loss"] <= pred.extras["fit_init_loss"] + 1e-6).all()
    from occbench.runner import Runner                          # the engine's path for fitting models
    runner = Runner(model)
    with runner.grad_context():
        joints, _, joints2d = runner(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    assert joints.shape == (1, 14, 3) and torch.isfinite(joints2d).all()
    prov = model.fit_provenance
    assert prov["kernel_subset"] == "farthest-point" and prov["num_kernels"] == 200
    assert prov["keypoint_term"] is False and "VPoser" in prov["pose_prior"]
    recorded = model.provenance                                 # what run directories store
    assert recorded["weights"] == "random" and recorded["fit"]["options"]["stage2_steps"] == 3
    assert recorded["fit"]["kernel_subset"] == "farthest-point" and recorded["fit"]["vposer"] is False


def test_bad_fit_option_is_rejected():
    with pytest.raises(ValueError, match="likelihood"):
        NF.FitOptions(likelihood="huber")
    with pytest.raises(ValueError, match="VPoser"):
        NF.FitOptions(vposer=True)


def test_official_subset_file_is_found_and_used_for_real_smpl(tmp_path, body):
    assert NF.find_official_subset(tmp_path) is None
    folder = tmp_path / "sample_params" / "uniform"
    folder.mkdir(parents=True)
    np.savez(folder / NF.OFFICIAL_SUBSET_FILE, indices=np.arange(0, 6890, 8)[:NUM_KERNELS],
             faces_downsampled=np.zeros((1, 3), np.int64))
    assert NF.find_official_subset(tmp_path) == folder / NF.OFFICIAL_SUBSET_FILE
    # the stand-in body is not SMPL: its kernels come from farthest-point sampling, and that is recorded
    _, prov = NF.kernel_subset(body, NUM_KERNELS, data_dir=tmp_path)
    assert prov["kernel_subset"] == "farthest-point" and prov["kernel_subset_reason"] == "stand-in body"

    class RealLooking:                                          # the same body, flagged as real SMPL
        is_standin = False
    index, prov = NF.kernel_subset(RealLooking(), NUM_KERNELS, data_dir=tmp_path)
    assert prov["kernel_subset"] == "official" and torch.equal(index[:3], torch.tensor([0, 8, 16]))


def test_keypoint_term(body):
    camera = PinholeCamera.for_crop(32)
    rot = torch.eye(3).expand(1, 24, 3, 3).clone()
    rot[:, 0] = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    translation = weak_perspective_to_translation(torch.tensor([[0.9, 0.0, 0.1]]))
    with torch.no_grad():
        joints = body(rotmat=rot).joints_lsp
    pixels = camera.project(joints + translation[:, None]) / (32 / 224)        # 224-crop px
    detections = torch.cat([pixels, torch.ones(1, 14, 1)], dim=-1)
    options = NF.FitOptions()
    exact = NF.keypoint_loss(joints, translation, detections, camera, 32 / 224, options)
    shifted = detections.clone()
    shifted[..., 0] += 10.0
    off = NF.keypoint_loss(joints, translation, shifted, camera, 32 / 224, options)
    assert exact.item() < 1e-6 and off.item() > 0.1
    unseen = shifted.clone()
    unseen[..., 2] = 0                                          # zero confidence: no term
    assert NF.keypoint_loss(joints, translation, unseen, camera, 32 / 224, options).item() == 0


@pytest.mark.parametrize("likelihood", ["robust", "plain", "l2"])
def test_likelihood_on_rays_equals_the_dense_formula(likelihood):
    gen = torch.Generator().manual_seed(6)
    camera = PinholeCamera.for_crop(12)
    centers = torch.tensor([0.0, 0.0, 50.0]) + 0.3 * torch.randn(2, 30, 3, generator=gen)
    features = F.normalize(torch.randn(2, 30, 8, generator=gen), dim=-1)
    clutter = F.normalize(torch.randn(8, generator=gen), dim=0)
    observed = torch.randn(2, 8, 12, 12, generator=gen)
    from occbench.models.nbf_render import render_gaussians
    out = render_gaussians(centers, 0.05, features, camera)
    assert 0.05 < out.opacity.mean() < 0.95
    f = F.normalize(observed, dim=1)
    opacity = out.opacity
    if likelihood == "l2":
        composite = out.features + (1 - opacity)[:, None] * clutter.view(1, -1, 1, 1)
        score = -((f - composite) ** 2).sum(1) / 4.0
    else:
        s_obj = (0.5 * (F.normalize(out.features, dim=1) * f).sum(1) + 0.5).clamp(1e-8, 1.0)
        s_clu = 0.5 * torch.einsum("bchw,c->bhw", f, clutter) + 0.5
        if likelihood == "robust":
            w = torch.softmax(torch.stack([s_obj, s_clu]) / 0.1, dim=0)
            s_obj = w[0] * s_obj + w[1] * s_clu
        score = opacity * s_obj + (1 - opacity) * s_clu
    dense = 1.0 - score.mean(dim=(1, 2))
    options = NF.FitOptions(likelihood=likelihood)
    loss = NF.likelihood_loss(out, NF.ObservedFeatures.from_map(observed, clutter), clutter, options)
    assert torch.allclose(loss, dense, atol=1e-6)

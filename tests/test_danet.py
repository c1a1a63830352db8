"""DaNet port (models/danet.py): RoI pooling and IUV operations by known values, graph buffers, the official
state-dict layout, prediction shapes, the 6D layout of the mean pose, and loading a checkpoint shaped like
danet_model_h36m_itw.pt through occbench.zoo.load_model."""
import math
import re

import numpy as np
import pytest
import torch

from helpers import random_state_dict_from_manifest, save_in_official_container
from occbench.checkpoints import manifest_path, read_manifest
from occbench.models import get_entry
from occbench.models import danet
from occbench.models.danet_modules import SMPL_CHILDREN, SMPL_PARENTS, SMPL_TO_DENSEPOSE_PARTS, graph_buffers
from occbench.rotations import axis_angle_to_rotmat, rotmat_to_rot6d

MANIFEST_NAME = "danet_h36m_itw.tsv"


def manifest_rows() -> list[tuple[str, tuple, str]]:
    return read_manifest(manifest_path(MANIFEST_NAME))


def is_known_unused(key: str) -> bool:
    return any(re.search(pattern, key) for pattern in get_entry("danet").known_unused)


MEAN_PARAMS = {"pose": np.tile(np.array([1, 0, 0, 1, 0, 0], np.float32), 24),
               "shape": np.zeros(10, np.float32), "cam": np.array([0.9, 0.0, 0.0], np.float32)}


@pytest.fixture(scope="module")
def model():
    # one thread: HRNet-W48 forwards are much faster than with threads competing on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield danet.build(mean_params=MEAN_PARAMS).eval()
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------- RoI pooling
def test_roi_pool_identity_reproduces_the_map():
    features = torch.randn(2, 3, 9, 9)
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 4, 2, 3)
    pooled = danet.roi_pool(features, theta)
    assert pooled.shape == (2, 4, 3, 9, 9)
    for j in range(4):
        torch.testing.assert_close(pooled[:, j], features, atol=1e-6, rtol=0)


def test_roi_pool_shift_samples_the_expected_pixel_with_align_corners_true():
    w, k = 9, 2
    features = torch.randn(1, 2, w, w)
    shift = 2.0 * k / (w - 1)  # k pixels in align_corners=True units ((W-1)/2 pixels per unit)
    theta = torch.tensor([[[[1.0, 0, shift], [0, 1.0, 0]]]])
    pooled = danet.roi_pool(features, theta)[0, 0]
    torch.testing.assert_close(pooled[..., : w - k], features[0, :, :, k:], atol=1e-5, rtol=0)
    assert pooled[..., w - k:].abs().max() < 1e-5  # zero padding beyond the map
    # align_corners=False would shift by k * W / (W - 1) pixels: the sample would fall between pixels
    assert not torch.allclose(
        torch.nn.functional.grid_sample(
            features, torch.nn.functional.affine_grid(theta[0], [1, 2, w, w], align_corners=False),
            align_corners=False)[..., : w - k],
        features[..., k:], atol=1e-3)


def test_roi_pool_zoom_and_offset_on_a_ramp():
    w = 11
    ramp_x = torch.arange(w, dtype=torch.float32).expand(w, w)      # value = column index
    ramp_y = ramp_x.t().contiguous()                                 # value = row index
    features = torch.stack([ramp_x, ramp_y])[None]
    scale, cx, cy = 0.5, 0.2, -0.4
    pooled = danet.roi_pool(features, danet.roi_thetas(torch.tensor([[[cx, cy]]]), torch.tensor([[scale]])))[0, 0]
    half = (w - 1) / 2.0
    cols = torch.arange(w, dtype=torch.float32)
    expected_x = (scale * (cols / half - 1.0) + cx + 1.0) * half     # input column sampled by output column j
    expected_y = (scale * (cols / half - 1.0) + cy + 1.0) * half
    torch.testing.assert_close(pooled[0], expected_x.expand(w, w), atol=1e-4, rtol=0)
    torch.testing.assert_close(pooled[1], expected_y[:, None].expand(w, w), atol=1e-4, rtol=0)


def test_roi_thetas_layout():
    theta = danet.roi_thetas(torch.tensor([[[0.1, -0.2]]]), torch.tensor([[0.3]]))
    torch.testing.assert_close(theta, torch.tensor([[[[0.3, 0.0, 0.1], [0.0, 0.3, -0.2]]]]))


# --------------------------------------------------------------------------- joint centres and scales
def test_soft_argmax_centres_use_danets_normalisation():
    heatmaps = torch.zeros(1, 24, 56, 56)
    rows = torch.randint(0, 56, (24,))
    cols = torch.randint(0, 56, (24,))
    heatmaps[0, torch.arange(24), rows, cols] = 5.0  # x10 sharpening -> softmax is one-hot
    centres = danet.soft_argmax_centres(heatmaps)
    expected = torch.stack([cols / 28.0 - 1.0, rows / 28.0 - 1.0], dim=1).float()
    torch.testing.assert_close(centres[0], expected, atol=1e-5, rtol=0)


def test_roi_scales_known_values():
    gen = torch.Generator().manual_seed(3)
    centres = torch.rand(1, 24, 2, generator=gen) * 1.6 - 0.8
    ratio = torch.full((24,), 1.5)
    ratio[4] = -1.0                              # relu -> 0: only the offset remains
    offset = torch.full((24,), 0.05)
    offset[7] = -2.0                             # relu -> 0
    hidden = torch.zeros(1, 24, dtype=torch.bool)
    hidden[0, [0, 9]] = True                     # the pelvis never falls back
    scales = danet.roi_scales(centres, ratio, offset, hidden)[0]

    c = centres[0]
    box_half = (c.max(0).values - c.min(0).values).max() / 2
    dist = lambda a, b: (c[a] - c[b]).norm()  # noqa: E731
    torch.testing.assert_close(scales[0], box_half * 1.5 + 0.05)
    torch.testing.assert_close(scales[4], torch.tensor(0.05))
    torch.testing.assert_close(scales[7], torch.maximum(dist(7, 4), dist(7, 10)) * 1.5)
    assert SMPL_CHILDREN[10] == 10  # a leaf: only the parent distance counts
    torch.testing.assert_close(scales[10], dist(10, SMPL_PARENTS[10]) * 1.5 + 0.05)
    torch.testing.assert_close(scales[9], 0.8 * box_half)


def test_hidden_joints_checks_the_parts_around_each_joint():
    index = torch.zeros(1, 25, 56, 56)
    index[:, 0] = 1.0                            # background everywhere ...
    index[0, 0, :, :28] = 0.0
    index[0, 12, :, :28] = 1.0                   # ... but part 12 (left lower leg) on the left half
    centres = torch.zeros(1, 24, 2)
    centres[0, :, 0] = 0.5                       # every joint in the right half
    centres[0, 4, 0] = -0.5                      # the left knee (parts 8, 10, 12, 14) in the left half
    centres[0, 7, 0] = -0.5                      # the left ankle (parts 12, 14, 5) too
    centres[0, 1, 0] = -0.5                      # the left hip (parts 8, 10) too, but part 12 is not its own
    hidden = danet.hidden_joints(index, centres)[0]
    assert 12 in SMPL_TO_DENSEPOSE_PARTS[4] and 12 not in SMPL_TO_DENSEPOSE_PARTS[1]
    assert not hidden[4] and not hidden[7]
    assert hidden[1] and hidden.sum() == 22


def test_clean_iuv_is_a_one_hot_argmax_mask():
    u, v, index = torch.rand(2, 25, 5, 5), torch.rand(2, 25, 5, 5), torch.randn(2, 25, 5, 5)
    cu, cv, one_hot = danet.clean_iuv(u, v, index)
    torch.testing.assert_close(one_hot.sum(1), torch.ones(2, 5, 5))
    assert torch.equal(one_hot.argmax(1), index.argmax(1))
    torch.testing.assert_close(cu.sum(1), u.gather(1, index.argmax(1, keepdim=True))[:, 0])
    torch.testing.assert_close(cv, v * one_hot)


# ---------------------------------------------------------------------------------------- graphs
def test_graph_buffers_known_values():
    g = {k: v[0] for k, v in graph_buffers().items()}
    torch.testing.assert_close(g["I_n"], torch.eye(24))
    assert torch.equal(g["A_link"], g["A_link"].t()) and g["A_link"].sum() == 46 and g["A_link"].trace() == 0
    assert g["A_mask"].trace() == 0 and torch.equal(g["A_mask"], g["A_mask"].t())
    assert g["A_mask"][1, 2] == 1 and g["A_mask"][12, 16] == 1 and g["A_mask"][0, 4] == 1  # extra / 2-hop links
    assert g["r2p_A"][0].abs().sum() == 0                        # the pelvis has no ancestor
    expected_knee = torch.zeros(24)
    expected_knee[[1, 0]] = 0.5                                   # left knee: its hip and the pelvis
    torch.testing.assert_close(g["r2p_A"][4], expected_knee)
    expected_root = torch.zeros(24)
    expected_root[[0, 1, 2, 3]] = 0.25                            # pelvis: itself and its three children
    torch.testing.assert_close(g["p2r_A"][0], expected_root)
    torch.testing.assert_close(g["p2r_A"].sum(1), torch.ones(24))
    degree = (g["A_mask"] + g["I_n"]).sum(0)
    torch.testing.assert_close(g["A"], (g["A_mask"] + g["I_n"]) / torch.sqrt(degree[:, None] * degree[None, :]))


def test_refinement_graph_with_unit_edge_importance_is_the_stored_A(model):
    regressor = model.iuv2smpl.smpl_para_Outs
    torch.testing.assert_close(regressor.refinement_graph(), regressor.A[0])


# ----------------------------------------------------------------------------------- model layout
def test_state_dict_matches_official_manifest_minus_known_unused(model):
    rows = manifest_rows()
    expected = [(k, s, d) for k, s, d in rows if not is_known_unused(k)]
    unused = [k for k, _, _ in rows if is_known_unused(k)]
    assert len(unused) == 356 and all(k.startswith("iuv2smpl.smpl_para_Outs.") for k in unused)
    actual = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    assert actual == expected


def test_build_rejects_unknown_options():
    from occbench.errors import UserError
    with pytest.raises(UserError, match="no options"):
        danet.build(mean_params=MEAN_PARAMS, backbone="hrnet_w32")


# ------------------------------------------------------------------------------------- predictions
def test_regress_shapes_finite_and_batch_independent(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rotmat, betas, cam, extras = model.regress(torch.randn(2, 3, 224, 224, generator=gen))
        small = torch.randn(2, 3, 96, 96, generator=gen)  # batch independence, checked on a cheaper input
        rotmat_pair, _, cam_pair, _ = model.regress(small)
        rotmat_one, _, cam_one, _ = model.regress(small[:1])
    assert rotmat.shape == (2, 24, 3, 3) and betas.shape == (2, 10) and cam.shape == (2, 3)
    assert all(torch.isfinite(t).all() for t in (rotmat, betas, cam))
    torch.testing.assert_close(rotmat @ rotmat.transpose(-1, -2), torch.eye(3).expand(2, 24, 3, 3),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotmat), torch.ones(2, 24), atol=1e-5, rtol=0)
    shapes = {k: tuple(v.shape) for k, v in extras.items()}
    assert shapes == {"iuv_map": (2, 75, 56, 56), "part_iuv_map": (2, 24, 3, 7, 56, 56),
                      "joint_centres": (2, 24, 2), "roi_scales": (2, 24), "hidden_joints": (2, 24),
                      "heatmaps": (2, 24, 56, 56)}
    # cleaned maps: one part label per pixel, in the global and in every partial map
    torch.testing.assert_close(extras["iuv_map"][:, 50:].sum(1), torch.ones(2, 56, 56))
    torch.testing.assert_close(extras["part_iuv_map"][:, :, 2].sum(2), torch.ones(2, 24, 56, 56))
    torch.testing.assert_close(rotmat_one, rotmat_pair[:1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cam_one, cam_pair[:1], atol=1e-5, rtol=1e-4)


def test_mean_pose_is_read_in_the_spin_6d_layout(model):
    """With the pose and camera/shape heads zeroed, DaNet outputs its mean buffers: a mean pose written by
    rotmat_to_rot6d (SPIN layout: first two columns, row-major) must come back as the same rotations."""
    regressor = model.iuv2smpl.smpl_para_Outs
    gen = torch.Generator().manual_seed(5)
    rotations = axis_angle_to_rotmat(torch.randn(24, 3, generator=gen))
    mean_cam_shape = torch.randn(1, 13, generator=gen)
    saved = {k: v.clone() for k, v in regressor.state_dict().items()}
    try:
        with torch.no_grad():
            regressor.pose_regressors["1"][1].weight.zero_()
            regressor.pose_regressors["1"][1].bias.zero_()
            regressor.body_net[3].final_layer.weight.zero_()
            regressor.body_net[3].final_layer.bias.zero_()
            regressor.mean_pose.copy_(rotmat_to_rot6d(rotations).reshape(1, 144))
            regressor.mean_cam_shape.copy_(mean_cam_shape)
            rotmat, betas, cam, _ = model.regress(torch.randn(1, 3, 64, 64, generator=gen))  # size-agnostic
    finally:
        regressor.load_state_dict(saved)
    torch.testing.assert_close(rotmat[0], rotations, atol=1e-5, rtol=0)
    torch.testing.assert_close(cam[0], mean_cam_shape[0, :3])
    torch.testing.assert_close(betas[0], mean_cam_shape[0, 3:])


def test_mean_params_fill_the_buffers(model):
    regressor = model.iuv2smpl.smpl_para_Outs
    torch.testing.assert_close(regressor.mean_pose[0], torch.as_tensor(MEAN_PARAMS["pose"]))
    torch.testing.assert_close(regressor.mean_cam_shape[0, :3], torch.as_tensor(MEAN_PARAMS["cam"]))
    assert math.isclose(float(regressor.mean_cam_shape[0, 3:].abs().sum()), 0.0)


# ------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def official_state() -> dict:
    """A random state dict with exactly the keys, shapes and dtypes of danet_model_h36m_itw.pt."""
    return random_state_dict_from_manifest(manifest_path(MANIFEST_NAME), seed=7)


def test_official_container_loads_strictly_through_load_model(tmp_path, official_state):
    from occbench.zoo import load_model

    state = official_state
    path = save_in_official_container(state, tmp_path / "danet_model_h36m_itw.pt", container="model-dict")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model("danet", checkpoint=path, device="cpu", weights="checkpoint")
        report = model.provenance["checkpoint_report"]
        assert report["ok"] and report["applied"]
        assert report["counts"]["loaded"] == len(model.state_dict()) == 2120
        assert sorted(report["known_unused"]) == sorted(k for k in state if is_known_unused(k))
        assert report["missing"] == report["unexpected"] == report["misshaped"] == []
        # every tensor the model holds is the file's tensor (nothing left at its random init)
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
        with torch.no_grad():
            prediction = model.predict(torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2)))
    finally:
        torch.set_num_threads(threads)
    assert prediction.rotmat.shape == (1, 24, 3, 3) and prediction.vertices.shape == (1, 6890, 3)
    assert prediction.joints2d.shape == (1, 14, 2)
    for tensor in (prediction.rotmat, prediction.betas, prediction.cam, prediction.vertices):
        assert torch.isfinite(tensor).all()


def test_a_checkpoint_missing_a_used_key_is_refused_by_name(tmp_path, official_state, model):
    from occbench.checkpoints import load_checkpoint_into
    from occbench.errors import UserError

    state = dict(official_state)
    del state["iuv2smpl.smpl_para_Outs.edge_importance"]
    state["img2iuv.learned_ratio"] = torch.zeros(25)
    path = save_in_official_container(state, tmp_path / "broken.pt", container="model-dict")
    entry = get_entry("danet")
    before = model.iuv2smpl.smpl_para_Outs.edge_importance.detach().clone()
    with pytest.raises(UserError) as err:
        load_checkpoint_into(model, path, strip_prefixes=entry.strip_prefixes, known_unused=entry.known_unused)
    message = str(err.value)
    assert "iuv2smpl.smpl_para_Outs.edge_importance" in message and "img2iuv.learned_ratio" in message
    assert str(path) in message
    assert torch.equal(model.iuv2smpl.smpl_para_Outs.edge_importance, before)  # a refused file changes nothing

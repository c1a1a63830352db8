"""BoPR (models/bopr.py): output shapes, mean-parameter start, manifest layout, torso-plane depths, load_model."""
import math

import pytest
import torch

from helpers import mean_params
from occbench.models import bopr
from occbench.rotations import axis_angle_to_rotmat


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return bopr.BoPR(mean_params(), backbone="hrnet_w32").eval()


@pytest.mark.parametrize("batch,size", [(1, 224), (2, 64)])
def test_output_shapes_and_finiteness(model, batch, size):
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    grid = size // 4
    with torch.no_grad():
        rotmat, betas, cam, extras = model.regress(images)
    assert rotmat.shape == (batch, 24, 3, 3) and betas.shape == (batch, 10) and cam.shape == (batch, 3)
    expected = {"pose6d": (batch, 144), "rel_depth": (batch, 24, 3), "aux_joints2d": (batch, 24, 2),
                "aux_joints3d": (batch, 24, 3), "body_attention": (batch, 1, grid, grid),
                "part_attention": (batch, 24, grid, grid), "tokens": (batch, 24, 128)}
    assert {k: tuple(v.shape) for k, v in extras.items()} == expected
    for t in [rotmat, betas, cam, *extras.values()]:
        assert torch.isfinite(t).all()
    # proper rotations
    eye = torch.eye(3).expand_as(rotmat)
    assert torch.allclose(rotmat @ rotmat.transpose(-1, -2), eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotmat), torch.ones(batch, 24), atol=1e-5)


def test_untrained_model_starts_near_the_mean_parameters(model):
    mean = mean_params()
    features = torch.rand(2, 480, 14, 14)
    with torch.no_grad():
        rotmat, betas, cam, extras = model.regress_from_features(features)
    from occbench.rotations import rot6d_to_rotmat
    mean_rot = rot6d_to_rotmat(mean["pose"]).view(1, 24, 3, 3)
    assert (rotmat - mean_rot).abs().max() < 0.1
    assert (betas - mean["shape"]).abs().max() < 0.1
    assert (cam - mean["cam"]).abs().max() < 0.1


def test_batch_items_are_independent(model):
    features = torch.rand(2, 480, 14, 14, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        both = model.regress_from_features(features)[0]
        first = model.regress_from_features(features[:1])[0]
    assert torch.allclose(both[:1], first, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


@pytest.mark.parametrize("backbone", ["hrnet_w32", "hrnet_w48"])
def test_state_dict_matches_committed_manifest(backbone):
    path = bopr.manifest_path(backbone)
    assert path.is_file(), f"{path} missing: run python -m occbench.models.bopr --write-manifests"
    lines = path.read_text().splitlines()
    model = bopr.BoPR(mean_params(), backbone=backbone)
    assert bopr.manifest_lines(model) == lines
    keys = [line.split("\t")[0] for line in lines]
    for key in ("init_pose", "token_embedding", "pose_head.weight", "depth_head.weight",
                "body_aware_transformer.1.query.weight", "regression_transformer.0.ffn2.weight",
                "backbone.stage4.2.fuse_layers.3.2.0.0.weight", "backbone.upsample_stage_4.9.weight"):
        assert key in keys
    assert not any(k.startswith("regression_transformer.1.") or k.startswith("body_aware_transformer.2.")
                   for k in keys)
    width = {"hrnet_w32": 480, "hrnet_w48": 720}[backbone]
    assert f"attention_layers.0.weight\t(128, {width}, 3, 3)\tfloat32" in lines


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="hrnet_w32"):
        bopr.BoPR(mean_params(), backbone="resnet50")


def test_torso_plane_depths_on_a_known_frame():
    # a torso in the SMPL rest frame (x left, y up, z forward), shifted and rotated 90 degrees about y
    joints = torch.zeros(1, 24, 3)
    joints[0, bopr.LEFT_HIP] = torch.tensor([0.1, -0.1, 0.0])
    joints[0, bopr.RIGHT_HIP] = torch.tensor([-0.1, -0.1, 0.0])
    joints[0, bopr.LEFT_SHOULDER] = torch.tensor([0.2, 0.5, 0.0])
    joints[0, bopr.RIGHT_SHOULDER] = torch.tensor([-0.2, 0.5, 0.0])
    points = torch.tensor([[[0.3, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, 0.25]]])
    depth = bopr.relative_torso_depths(points, joints)            # rows: point; cols: frontal, side, cross
    assert torch.allclose(depth[0], torch.tensor([[0.0, 0.3, 0.0], [0.0, 0.0, 0.4], [0.25, 0.0, 0.0]]),
                          atol=1e-6)
    rot = axis_angle_to_rotmat(torch.tensor([0.0, math.pi / 2, 0.0]))[0]
    shift = torch.tensor([1.0, 2.0, 3.0])
    moved = bopr.relative_torso_depths(points @ rot.T + shift, joints @ rot.T + shift)
    assert torch.allclose(moved, depth, atol=1e-5)


def test_segmentation_targets_splat_projected_vertices():
    points = torch.tensor([[[10.0, 10.0], [200.0, 30.0], [-5.0, 3.0]]])
    labels = torch.tensor([3, 7, 1])
    mask, parts = bopr.segmentation_targets(points, labels, size=56)
    assert mask.shape == (1, 56, 56) and mask.sum() == 2        # the third point is outside the crop
    assert parts[0, 2, 2] == 3 and parts[0, 7, 50] == 7 and (parts == -1).sum() == 56 * 56 - 2


def test_checkpoint_round_trip_through_load_model(tmp_path):
    """A file written by torch.save({'model': state_dict}) or BoPR.save_checkpoint loads strictly."""
    from occbench.zoo import load_model

    torch.manual_seed(7)                                   # load_model builds with seed 0: different weights
    trained = bopr.build(backbone="hrnet_w32").eval()
    plain = tmp_path / "bopr_plain.pt"
    torch.save({"model": trained.state_dict()}, plain)
    with_meta = tmp_path / "bopr.pt"
    trained.save_checkpoint(with_meta, steps=10)
    assert torch.load(with_meta)["occbench"] == {"model": "bopr", "backbone": "hrnet_w32", "steps": 10}
    for path in (plain, with_meta):
        loaded = load_model("bopr", checkpoint=path, device="cpu")
        assert loaded.provenance["checkpoint"] == str(path) and loaded.provenance["weights"] == "checkpoint"
        state = loaded.state_dict()
        assert list(state) == list(trained.state_dict())
        assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.regress(images)[0], trained.regress(images)[0], atol=1e-6)
    random_model = load_model("bopr", weights="random", device="cpu")
    assert random_model.provenance["weights"] == "random" and random_model.provenance["checkpoint"] is None
    assert not torch.equal(random_model.state_dict()["pose_head.weight"], trained.state_dict()["pose_head.weight"])

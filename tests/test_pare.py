"""PARE port: official layouts of the three configurations, strict Lightning loading, attention known values."""
import numpy as np
import pytest
import torch

from helpers import model_layout_from_manifest, random_state_dict_from_manifest, save_in_official_container
from occbench.checkpoints import check_checkpoint, manifest_path
from occbench.errors import UserError
from occbench.models import build_model, get_entry
from occbench.models.pare import LocallyConnected2d, PareHead, attention_pool, part_attention
from occbench.zoo import load_model

CONFIGS = {  # manifest -> build options, part-map resolution at 224 px
    "pare_hrnet_w32.tsv": ({"backbone": "hrnet_w32", "head": "2x128"}, 56),
    "pare_resnet50.tsv": ({"backbone": "resnet50", "head": "2x128"}, 28),
    "pare_resnet50_3x256.tsv": ({"backbone": "resnet50", "head": "3x256"}, 56),
}
MEAN = {"pose": np.tile(np.array([1, 0, 0, 1, 0, 0], np.float32), 24),
        "shape": np.full(10, 0.5, np.float32), "cam": np.array([0.9, 0.0, 0.0], np.float32)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_equals_manifest_minus_known_unused(name):
    entry = get_entry("pare")
    options, _ = CONFIGS[name]
    expected = model_layout_from_manifest(manifest_path(name), entry.strip_prefixes, entry.known_unused)
    model = build_model("pare", mean_params=MEAN, **options)
    got = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    assert got == expected
    assert model.manifest == name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loads_lightning_checkpoint_strictly(tmp_path, name):
    options, size = CONFIGS[name]
    tsv = manifest_path(name)
    # the manifest keys already carry the Lightning layout: `model.` network keys + trainer-level buffers
    state = random_state_dict_from_manifest(tsv, seed=2)
    path = save_in_official_container(state, tmp_path / "pare_checkpoint.ckpt", container="lightning")
    model = load_model("pare", checkpoint=path, weights="checkpoint", device="cpu", **options)
    report = model.provenance["checkpoint_report"]
    assert report["ok"] and report["container"] == "lightning"
    assert report["counts"]["loaded"] == report["counts"]["model_tensors"] == len(model.state_dict())
    assert report["counts"]["loaded"] + report["counts"]["known_unused"] == len(state)
    assert "smpl.betas" in report["known_unused"] and "model.smpl.smpl.posedirs" in report["known_unused"]
    if options["backbone"] == "hrnet_w32":
        assert "model.backbone.final_layer.weight" in report["known_unused"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model." + key]), key
    batch = 2 if options["backbone"] == "resnet50" else 1  # HRNet at 224 px is the slow one on CPU
    crops = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model.predict(crops)
    for field, shape in {"rotmat": (24, 3, 3), "betas": (10,), "cam": (3,), "vertices": (6890, 3),
                         "joints_lsp": (14, 3), "joints2d": (14, 2)}.items():
        value = getattr(pred, field)
        assert tuple(value.shape) == (batch,) + shape, field
        assert torch.isfinite(value).all(), field
    assert tuple(pred.extras["part_maps"].shape) == (batch, 25, size, size)


def test_corrupted_and_mismatched_files_are_reported(tmp_path):
    state = random_state_dict_from_manifest(manifest_path("pare_resnet50.tsv"))
    state["model.head.cam_mlp.weigth"] = state.pop("model.head.cam_mlp.weight")
    bad = save_in_official_container(state, tmp_path / "bad.ckpt", container="lightning")
    with pytest.raises(UserError) as info:
        load_model("pare", checkpoint=bad, weights="checkpoint", device="cpu", backbone="resnet50")
    assert "head.cam_mlp.weight" in str(info.value) and "cam_mlp.weigth" in str(info.value)
    # a 2x128 file given to the 3x256 configuration: wrong shapes and missing layers, named
    state["model.head.cam_mlp.weight"] = state.pop("model.head.cam_mlp.weigth")
    other = save_in_official_container(state, tmp_path / "r50.ckpt", container="lightning")
    with pytest.raises(UserError, match="misshaped|wrong shape"):
        load_model("pare", checkpoint=other, weights="checkpoint", device="cpu", backbone="resnet50", head="3x256")
    entry = get_entry("pare")
    report = check_checkpoint(build_model("pare", mean_params=MEAN, backbone="resnet50", head="3x256"), other,
                              entry.strip_prefixes, entry.known_unused)
    assert "head.keypoint_deconv_layers.6.weight" in report.missing
    assert ("head.pose_mlp.weight", (1, 6, 128, 24, 1, 1), (1, 6, 256, 24, 1, 1)) in report.misshaped


def test_part_attention_drops_background_and_normalises_each_part():
    logits = torch.randn(2, 25, 5, 7)
    attention = part_attention(logits)
    assert attention.shape == (2, 24, 5, 7)
    torch.testing.assert_close(attention.sum(dim=(2, 3)), torch.ones(2, 24))
    changed = logits.clone()
    changed[:, 0] += 100.0  # the background map has no influence
    torch.testing.assert_close(part_attention(changed), attention)
    peaked = torch.zeros(1, 25, 4, 4)
    peaked[0, 3, 1, 2] = 1e4  # part 2 (channel 3) attends to one pixel
    features = torch.randn(1, 8, 4, 4)
    pooled = attention_pool(features, part_attention(peaked))
    torch.testing.assert_close(pooled[0, :, 2], features[0, :, 1, 2])
    torch.testing.assert_close(pooled[0, :, 0], features[0].mean(dim=(1, 2)))  # flat map: the mean


def test_locally_connected_is_one_linear_map_per_joint():
    layer = LocallyConnected2d(5, 6, (24, 1))
    assert tuple(layer.weight.shape) == (1, 6, 5, 24, 1, 1)
    x = torch.randn(3, 5, 24, 1)
    out = layer(x)
    expected = torch.stack([x[:, :, j, 0] @ layer.weight[0, :, :, j, 0, 0].T for j in range(24)], dim=2)
    torch.testing.assert_close(out[..., 0], expected)


def small_head():
    torch.manual_seed(0)
    head = PareHead(in_channels=8, num_layers=1, filters=16, upsample=False, mean_params=MEAN).eval()
    with torch.no_grad():  # flat part maps: uniform attention
        head.keypoint_final_layer.weight.zero_()
        head.keypoint_final_layer.bias.zero_()
    return head


def test_mlps_read_channel_major_features_and_do_not_add_the_mean():
    head = small_head()
    with torch.no_grad():
        for layer in (head.shape_mlp, head.cam_mlp, head.pose_mlp):
            layer.weight.zero_()
        head.shape_mlp.bias.zero_()
        head.cam_mlp.bias.zero_()
        channel, joint = 5, 7
        head.shape_mlp.weight[0, channel * 24 + joint] = 1.0  # flatten order of (B, 64, 24) is c * 24 + j
        features = torch.randn(2, 8, 6, 6)
        pose6d, betas, cam, part_maps = head(features)
        smpl_features = head.smpl_final_layer(head.smpl_deconv_layers(features))
    assert part_maps.shape == (2, 25, 6, 6)
    torch.testing.assert_close(betas[:, 0], smpl_features[:, channel].mean(dim=(1, 2)))
    # released configuration: no iterative regression, the init_* buffers are not added
    assert torch.count_nonzero(betas[:, 1:]) == 0 and torch.count_nonzero(cam) == 0
    assert torch.count_nonzero(pose6d) == 0 and pose6d.shape == (2, 24, 6)


def test_resnet_head_upsamples_and_options_are_checked():
    r50 = build_model("pare", mean_params=MEAN, backbone="resnet50", head="3x256").eval()
    with torch.no_grad():
        rotmat, betas, cam, extras = r50.regress(torch.randn(1, 3, 64, 64))  # layer4 2x2 -> 16x16
    assert extras["part_maps"].shape == (1, 25, 16, 16) and extras["pose6d"].shape == (1, 24, 6)
    assert rotmat.shape == (1, 24, 3, 3) and betas.shape == (1, 10) and cam.shape == (1, 3)
    with pytest.raises(ValueError, match="backbone"):
        build_model("pare", mean_params=MEAN, backbone="vgg16")
    with pytest.raises(ValueError, match="head"):
        build_model("pare", mean_params=MEAN, head="4x512")


def test_small_trunk_and_mean_parameter_switches():
    """backbone_stages=3 stops ResNet-18 after layer3 (stride 16); use_mean_* add the init buffers."""
    model = build_model("pare", mean_params=MEAN, backbone="resnet18", backbone_stages=3, input_size=128,
                        use_mean_pose=True, use_mean_camshape=True).eval()
    assert model.input_size == 128 and model.manifest is None
    assert "backbone.layer4.0.conv1.weight" not in model.state_dict()
    assert model.state_dict()["head.keypoint_deconv_layers.0.weight"].shape == (256, 128, 4, 4)
    with torch.no_grad():
        for layer in (model.head.shape_mlp, model.head.cam_mlp, model.head.pose_mlp):
            layer.weight.zero_()
        model.head.shape_mlp.bias.zero_()
        model.head.cam_mlp.bias.zero_()
        rotmat, betas, cam, extras = model.regress(torch.randn(1, 3, 128, 128))
    assert extras["part_maps"].shape == (1, 25, 32, 32)  # 128 / 16 = 8, two x2 deconvs
    torch.testing.assert_close(betas[0], torch.from_numpy(MEAN["shape"]))
    torch.testing.assert_close(cam[0], torch.from_numpy(MEAN["cam"]))
    torch.testing.assert_close(extras["pose6d"][0], torch.from_numpy(MEAN["pose"]).view(24, 6))
    torch.testing.assert_close(rotmat[0], torch.eye(3).expand(24, 3, 3))
    with pytest.raises(ValueError, match="backbone_stages"):
        build_model("pare", mean_params=MEAN, backbone_stages=3)

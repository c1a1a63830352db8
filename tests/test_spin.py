"""SPIN / HMR-EFT port: official layout, loading the official container strictly, known values."""
import math

import numpy as np
import pytest
import torch

from helpers import model_layout_from_manifest, random_state_dict_from_manifest, save_in_official_container
from occbench.checkpoints import manifest_path
from occbench.errors import UserError
from occbench.models import build_model, get_entry
from occbench.rotations import rot6d_to_rotmat
from occbench.zoo import load_model


def mean_params_identity():
    return {"pose": np.tile(np.array([1, 0, 0, 1, 0, 0], np.float32), 24),
            "shape": np.linspace(-1, 1, 10).astype(np.float32), "cam": np.array([0.9, 0.1, -0.2], np.float32)}


def zero_regressor_outputs(model):
    with torch.no_grad():
        for layer in (model.decpose, model.decshape, model.deccam):
            layer.weight.zero_()
            layer.bias.zero_()


def test_state_dict_equals_manifest_key_for_key():
    entry = get_entry("spin")
    expected = model_layout_from_manifest(manifest_path("spin_hmr.tsv"), entry.strip_prefixes, entry.known_unused)
    model = build_model("spin", mean_params=mean_params_identity())
    got = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    assert got == expected  # same keys, shapes, dtypes, and the official order


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A random state dict in SPIN's {'model': ...} container, written once for the module."""
    state = random_state_dict_from_manifest(manifest_path("spin_hmr.tsv"), seed=1)
    path = tmp_path_factory.mktemp("spin") / "model_checkpoint.pt"
    return state, save_in_official_container(state, path, container="model-dict")


@pytest.mark.parametrize("name", ["spin", "hmr-eft"])
def test_loads_official_container_strictly(official_file, name):
    state, path = official_file
    model = load_model(name, checkpoint=path, weights="checkpoint", device="cpu")
    report = model.provenance["checkpoint_report"]
    assert report["ok"] and report["counts"]["loaded"] == len(state) == report["counts"]["model_tensors"]
    assert not report["missing"] and not report["unexpected"]
    for key, value in model.state_dict().items():  # every tensor consumed, with its value
        assert torch.equal(value, state[key]), key
    crops = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model.predict(crops)
    shapes = {"rotmat": (2, 24, 3, 3), "betas": (2, 10), "cam": (2, 3), "vertices": (2, 6890, 3),
              "joints_smpl": (2, 24, 3), "joints_h36m": (2, 17, 3), "joints_lsp": (2, 14, 3), "joints2d": (2, 14, 2)}
    for field, shape in shapes.items():
        value = getattr(pred, field)
        assert tuple(value.shape) == shape, field
        assert torch.isfinite(value).all(), field
    eye = torch.eye(3).expand(2, 24, 3, 3)
    torch.testing.assert_close(pred.rotmat @ pred.rotmat.transpose(-1, -2), eye, atol=1e-5, rtol=0)


def test_corrupted_key_name_is_reported(tmp_path, official_file):
    state = dict(official_file[0])
    state["fc1.weights"] = state.pop("fc1.weight")
    path = save_in_official_container(state, tmp_path / "bad.pt", container="model-dict")
    with pytest.raises(UserError) as info:
        load_model("spin", checkpoint=path, weights="checkpoint", device="cpu")
    assert "fc1.weight" in str(info.value) and "fc1.weights" in str(info.value) and str(path) in str(info.value)


# regress() pools layer4 globally, so small images exercise the same path faster than 224 px.
def test_zero_regressor_predicts_the_mean_parameters():
    from occbench.body import load_mean_params

    mean = load_mean_params()
    model = build_model("spin", mean_params=mean).eval()
    zero_regressor_outputs(model)
    with torch.no_grad():
        rotmat, betas, cam, extras = model.regress(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(extras["pose6d"], torch.from_numpy(mean["pose"]).expand(2, -1), rtol=0, atol=0)
    torch.testing.assert_close(betas, torch.from_numpy(mean["shape"]).expand(2, -1), rtol=0, atol=0)
    torch.testing.assert_close(cam, torch.from_numpy(mean["cam"]).expand(2, -1), rtol=0, atol=0)
    expected = rot6d_to_rotmat(torch.from_numpy(mean["pose"])).reshape(24, 3, 3).expand(2, -1, -1, -1)
    torch.testing.assert_close(rotmat, expected, rtol=0, atol=0)


def test_three_residual_iterations_from_the_mean():
    """With only decoder biases, each IEF iteration adds the bias once: mean + 3 * bias."""
    model = build_model("spin", mean_params=mean_params_identity()).eval()
    zero_regressor_outputs(model)
    with torch.no_grad():
        model.decshape.bias.fill_(0.25)
        model.deccam.bias.copy_(torch.tensor([0.1, 0.0, -0.1]))
        _, betas, cam, _ = model.regress(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(betas[0], torch.linspace(-1, 1, 10) + 0.75)
    torch.testing.assert_close(cam[0], torch.tensor([1.2, 0.1, -0.5]))


def test_6d_convention_first_two_columns():
    """A mean pose holding R[:, :2] (row-major) of a known rotation comes back as that rotation."""
    angle = math.pi / 3
    rz = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0],
                       [0.0, 0.0, 1.0]])
    params = mean_params_identity()
    params["pose"] = np.tile(rz[:, :2].reshape(6).numpy(), 24)
    model = build_model("spin", mean_params=params).eval()
    zero_regressor_outputs(model)
    with torch.no_grad():
        rotmat, _, _, _ = model.regress(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(rotmat[0], rz.expand(24, 3, 3), atol=1e-6, rtol=0)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="num_iterations"):
        build_model("spin", mean_params=mean_params_identity(), num_iterations=0)
    with pytest.raises(ValueError, match="pose"):
        build_model("spin", mean_params={"pose": np.zeros(10), "shape": np.zeros(10), "cam": np.zeros(3)})


def test_small_configuration_keeps_the_key_names_and_shrinks_the_shapes():
    """resnet18 cut after layer3 with a 512-wide regressor (spin-demo): the official key names of the
    layers it keeps, 256 pooled features, and the official 2205-wide input layout of fc1 scaled down."""
    model = build_model("spin", mean_params=mean_params_identity(), backbone="resnet18", backbone_stages=3,
                        hidden_size=512, input_size=96).eval()
    state = model.state_dict()
    assert not any(key.startswith("layer4.") for key in state)
    assert state["layer3.1.conv2.weight"].shape == (256, 256, 3, 3)
    assert state["fc1.weight"].shape == (512, 256 + 144 + 10 + 3)
    assert state["decpose.weight"].shape == (144, 512)
    assert model.input_size == 96
    with torch.no_grad():
        rotmat, betas, cam, extras = model.regress(torch.randn(2, 3, 96, 96))
    assert extras["features"].shape == (2, 256)
    assert rotmat.shape == (2, 24, 3, 3) and betas.shape == (2, 10) and cam.shape == (2, 3)
    official = build_model("spin", mean_params=mean_params_identity())
    assert official.input_size == 224 and official.feature_dim == 2048


@pytest.mark.parametrize("bad, message", [({"backbone": "vgg16"}, "backbone"), ({"input_size": 100}, "multiple of 32"),
                                          ({"hidden_size": 0}, "hidden_size")])
def test_small_configuration_rejects_bad_options(bad, message):
    with pytest.raises(ValueError, match=message):
        build_model("spin", mean_params=mean_params_identity(), **bad)

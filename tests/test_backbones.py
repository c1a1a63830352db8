"""Backbones: official key layouts (from the manifests) and output shapes on tiny inputs."""
import re

import pytest
import torch

from occbench.checkpoints import manifest_path, read_manifest
from occbench.models.backbones.hrnet import HRNet, hrnet_w32, hrnet_w48
from occbench.models.backbones.resnet import ResNet, resnet18, resnet50


def manifest_layout(name: str, prefix: str, exclude: str | None = None) -> dict:
    """{key without prefix: shape} of the manifest entries under ``prefix``, minus keys matching ``exclude``."""
    rows = read_manifest(manifest_path(name))
    layout = {key[len(prefix):]: shape for key, shape, _ in rows if key.startswith(prefix)}
    layout = {k: v for k, v in layout.items() if exclude is None or not re.search(exclude, k)}
    assert layout, f"no key under {prefix!r} in {name}"
    return layout


def layout_of(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_hrnet_w32_conv_matches_pare_backbone_layout():
    expected = manifest_layout("pare_hrnet_w32.tsv", "model.backbone.")
    assert layout_of(hrnet_w32(output="concat_conv", final_layer_channels=24)) == expected


def test_hrnet_w48_single_scale_matches_danet_iuv_estimator_layout():
    expected = manifest_layout("danet_h36m_itw.tsv", "img2iuv.iuv_est.", exclude=r"^final_pred\.")
    assert layout_of(hrnet_w48(output="highres", multi_scale_output=False)) == expected


@pytest.mark.parametrize("manifest,prefix,exclude", [
    ("pare_resnet50.tsv", "model.backbone.", None),
    ("3dnbf_r50.tsv", "backbone.", r"^dummy_token$"),
    ("spin_hmr.tsv", "", r"^(fc1|fc2|decpose|decshape|deccam|init_pose|init_shape|init_cam)\b"),
])
def test_resnet50_matches_official_layouts(manifest, prefix, exclude):
    assert layout_of(resnet50()) == manifest_layout(manifest, prefix, exclude)


def test_resnet_shapes_and_stages():
    x = torch.randn(2, 3, 64, 64)
    r50 = resnet50().eval()
    with torch.no_grad():
        assert r50(x).shape == (2, 2048, 2, 2)
        stages = r50.forward_stages(x)
    assert [tuple(stages[k].shape[1:]) for k in ("stem", "layer1", "layer2", "layer3", "layer4")] == [
        (64, 16, 16), (256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]
    r18 = resnet18().eval()
    assert not any(".conv3." in k for k in r18.state_dict())
    assert r18.state_dict()["layer4.1.bn2.weight"].shape == (512,)
    with torch.no_grad():
        assert r18(x).shape == (2, 512, 2, 2)
        assert ResNet(18, num_classes=7)(x).shape == (2, 7)
    with pytest.raises(ValueError, match="depth"):
        ResNet(42)


def test_hrnet_outputs():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    net = HRNet(32, output="list").eval()
    with torch.no_grad():
        ys = net(x)
    assert [tuple(y.shape[1:]) for y in ys] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    state = net.state_dict()
    for output, shape in [("concat_conv", (480, 16, 16)), ("concat_interp", (480, 16, 16)),
                          ("downsample_conv", (480, 2, 2)), ("downsample_interp", (480, 2, 2)),
                          ("highres", (32, 16, 16))]:
        other = HRNet(32, output=output).eval()
        # the shared trunk weights give the same branches: branch 1 passes through unchanged
        missing, unexpected = other.load_state_dict(state, strict=False)
        assert not unexpected and all("sample_stage" in k for k in missing)
        with torch.no_grad():
            out = other(x)
        assert out.shape[1:] == shape, output
        assert other.out_channels == shape[0]
        if shape[1] == 16:
            torch.testing.assert_close(out[:, :32], ys[0])
        else:
            torch.testing.assert_close(out[:, -256:], ys[3])
    single = hrnet_w48(output="highres", multi_scale_output=False).eval()
    with torch.no_grad():
        assert single(x).shape == (1, 48, 16, 16)
    heat = HRNet(32, output="final_layer", final_layer_channels=24).eval()
    with torch.no_grad():
        assert heat(x).shape == (1, 24, 16, 16)


def test_hrnet_rejects_bad_options():
    with pytest.raises(ValueError, match="output"):
        HRNet(32, output="nope")
    with pytest.raises(ValueError, match="multi_scale_output"):
        HRNet(32, output="concat_conv", multi_scale_output=False)
    with pytest.raises(ValueError, match="final_layer_channels"):
        HRNet(32, output="final_layer")


def test_resnet_truncated_trunk():
    r18 = ResNet(18, num_stages=3).eval()
    assert r18.out_channels == 256 and not any(k.startswith("layer4.") for k in r18.state_dict())
    with torch.no_grad():
        assert r18(torch.randn(1, 3, 64, 64)).shape == (1, 256, 4, 4)
    with pytest.raises(ValueError, match="num_stages"):
        ResNet(18, num_stages=5)

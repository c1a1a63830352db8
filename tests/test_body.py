"""occbench.body on the stand-in: smplx forward, joint sets, shape, provenance, asset lookup, pkl without chumpy."""
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import scipy.sparse
import torch

from occbench.assets import MissingAssetError
from occbench.data.joints import H36M_TO_J14
from occbench.body import (SMPL24_TO_H36M, load_body_model, load_mean_params,
                           vertex_part_labels)
from occbench.errors import UserError
from occbench.rotations import axis_angle_to_rotmat, rot6d_to_rotmat
from occbench.smpl_io import convert_smpl_pkl, load_smpl_file, load_smpl_pkl
from occbench.standin import standin_dir


@pytest.fixture(scope="module")
def body():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_body_model(smpl_dir=standin_dir())


def test_shapes_and_provenance(body):
    out = body(torch.eye(3).expand(2, 24, 3, 3), torch.zeros(2, 10))
    assert out.vertices.shape == (2, 6890, 3) and out.joints_smpl.shape == (2, 24, 3)
    assert out.joints_h36m.shape == (2, 17, 3) and out.joints_lsp.shape == (2, 14, 3)
    assert body.faces.shape == (13776, 3) and body.faces.dtype == np.int64
    assert body.is_standin and body.provenance["standin"]
    assert body.provenance["joint_regressor"] == "h36m"
    assert len(body.provenance["sha256"]["smpl"]) == 64
    assert body.provenance["standin_version"].startswith("occbench-standin-")
    assert torch.allclose(out.joints_lsp, out.joints_h36m[:, list(H36M_TO_J14)])


def test_rest_pose_anatomy(body):
    out = body(torch.eye(3).expand(1, 24, 3, 3), torch.zeros(1, 10))
    smpl, lsp = out.joints_smpl[0], out.joints_lsp[0]
    # SMPL convention: y up, the body's left side at +x
    assert smpl[15, 1] > smpl[12, 1] > smpl[0, 1] > smpl[4, 1] > smpl[7, 1]
    for left, right in ((1, 2), (4, 5), (7, 8), (16, 17), (18, 19), (20, 21)):
        assert smpl[left, 0] > 0.03 and smpl[right, 0] < -0.03
    # LSP order: r ankle, r knee, r hip, l hip, l knee, l ankle, r wrist, r elbow, r shoulder,
    # l shoulder, l elbow, l wrist, neck, head top
    assert (lsp[[0, 1, 2, 6, 7, 8], 0] < 0).all() and (lsp[[3, 4, 5, 9, 10, 11], 0] > 0).all()
    assert lsp[0, 1] < lsp[1, 1] < lsp[2, 1] < lsp[12, 1] < lsp[13, 1]
    assert abs(lsp[6, 0]) > abs(lsp[7, 0]) > abs(lsp[8, 0])  # T-pose arms: wrist outside elbow outside shoulder
    assert lsp[13, 1] > out.vertices[0, :, 1].max() - 0.06  # head top near the top of the head
    assert torch.allclose(out.joints_h36m[0, 0, :2], smpl[0, :2], atol=0.06)


def test_posed_body_finite_and_follows_pose(body):
    pose = torch.zeros(2, 72)
    pose[:, 16 * 3 + 2] = -1.2  # left shoulder: arm down
    pose[1, 0] = np.pi  # SPIN's upright camera-frame orientation
    out = body.forward_axis_angle(pose, torch.randn(2, 10, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(out.vertices).all()
    assert out.joints_smpl[0, 20, 1] < out.joints_smpl[0, 16, 1] - 0.3  # left wrist well below shoulder
    assert out.joints_smpl[1, 15, 1] < out.joints_smpl[1, 0, 1]  # flipped: head has lower y (y down)
    rot = axis_angle_to_rotmat(pose.reshape(-1, 3)).reshape(2, 24, 3, 3)
    assert torch.allclose(body(rot, out.vertices.new_zeros(2, 10)).vertices,
                          body.forward_axis_angle(pose, torch.zeros(2, 10)).vertices, atol=1e-6)


def test_beta0_height_monotonic(body):
    betas = torch.zeros(5, 10)
    betas[:, 0] = torch.linspace(-2, 2, 5)
    heights = body(torch.eye(3).expand(5, 24, 3, 3), betas).vertices[..., 1]
    heights = heights.max(1).values - heights.min(1).values
    assert (heights.diff() > 0.02).all()
    girth = torch.zeros(2, 10)
    girth[:, 1] = torch.tensor([-2.0, 2.0])
    verts = body(torch.eye(3).expand(2, 24, 3, 3), girth).vertices
    waist = (verts[..., 1] - (-0.05)).abs() < 0.03
    assert verts[1][waist[1]][:, 2].max() > verts[0][waist[0]][:, 2].max() + 0.01


def test_mean_params_upright_in_camera_frame(body):
    mean = load_mean_params()
    assert mean["pose"].shape == (144,) and mean["pose"].dtype == np.float32
    rot = rot6d_to_rotmat(torch.from_numpy(mean["pose"])).reshape(1, 24, 3, 3)
    out = body(rot, torch.from_numpy(mean["shape"])[None])
    assert out.joints_lsp[0, 13, 1] < out.joints_lsp[0, 0, 1] - 1.0  # head top above the ankle, y down
    assert 0.5 < mean["cam"][0] < 1.5


def test_part_labels(body):
    labels = vertex_part_labels(body)
    assert labels.shape == (6890,) and labels.min() == 0 and labels.max() == 23
    assert set(np.unique(labels)) == set(range(24))
    verts = body.smpl.v_template.numpy()
    assert verts[labels == 15, 1].mean() > 0.35  # head
    assert verts[labels == 20, 0].mean() > 0.6 and verts[labels == 21, 0].mean() < -0.6  # wrists


def test_gendered_and_device(body):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        male = load_body_model(smpl_dir=standin_dir(), gender="m", device="cpu")
    assert male.gender == "male" and male.is_standin
    assert not torch.allclose(male.smpl.v_template, body.smpl.v_template)
    with pytest.raises(UserError):
        load_body_model(smpl_dir=standin_dir(), gender="child")


def test_missing_user_folder(tmp_path):
    with pytest.raises(MissingAssetError, match=r"SMPL_NEUTRAL\.pkl.*smpl\.is\.tue\.mpg\.de"):
        load_body_model(smpl_dir=tmp_path)
    with pytest.raises(MissingAssetError, match="smpl_mean_params.npz"):
        load_mean_params(data_dir=tmp_path)


def test_default_is_standin_with_one_warning(monkeypatch, tmp_path):
    import occbench.body as body_module
    import occbench.assets as assets
    monkeypatch.delenv("OCCBENCH_SMPL_DIR", raising=False)
    monkeypatch.setitem(assets.ASSET_DIRS, "OCCBENCH_SMPL_DIR",
                        (tmp_path / "nothing", *assets.ASSET_DIRS["OCCBENCH_SMPL_DIR"][1:]))
    monkeypatch.setattr(body_module, "_warned_standin", False)
    with pytest.warns(UserWarning, match="stand-in body: numbers are not comparable"):
        default = load_body_model()
    assert default.is_standin
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_body_model()  # warned once only


def _fake_smpl_pickle(path, protocol):
    """Write a pickle shaped like the released SMPL files: chumpy Ch arrays + a scipy.sparse J_regressor."""
    data = load_smpl_file(standin_dir() / "SMPL_NEUTRAL.npz")
    chumpy = types.ModuleType("chumpy")
    chumpy_ch = types.ModuleType("chumpy.ch")

    class Ch:  # what matters is the pickled class path and the array in state['x']
        def __init__(self, x):
            self.x = x
            self._dirty_vars = set()
            self._itr = None
            self._depends_on_deps = {}
    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    chumpy_ch.Ch = Ch
    chumpy.ch = chumpy_ch
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, chumpy_ch
    try:
        raw = {
            "v_template": Ch(data["v_template"]), "shapedirs": Ch(data["shapedirs"]),
            "posedirs": data["posedirs"], "weights": Ch(data["weights"]), "f": data["f"].astype(np.uint32),
            "kintree_table": data["kintree_table"], "J": Ch(data["J"]), "bs_type": "lrotmin", "bs_style": "lbs",
            "J_regressor": scipy.sparse.csc_matrix(data["J_regressor"]),
        }
        path.write_bytes(pickle.dumps(raw, protocol=protocol))
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    return data


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_pkl_with_chumpy_loads_without_chumpy(tmp_path, protocol):
    pkl = tmp_path / "SMPL_NEUTRAL.pkl"
    data = _fake_smpl_pickle(pkl, protocol)
    assert "chumpy" not in sys.modules
    loaded = load_smpl_pkl(pkl)
    assert isinstance(loaded["shapedirs"], np.ndarray) and isinstance(loaded["J_regressor"], np.ndarray)
    assert np.array_equal(loaded["v_template"], data["v_template"])
    assert np.allclose(loaded["J_regressor"], data["J_regressor"])
    out = convert_smpl_pkl(pkl, tmp_path / "out" / "SMPL_NEUTRAL.npz")
    with np.load(out, allow_pickle=False) as converted:
        assert np.array_equal(converted["shapedirs"], data["shapedirs"])
    # a real-SMPL folder without J_regressor_h36m.npy falls back to the 24 SMPL joints, and says so
    with pytest.warns(UserWarning, match="J_regressor_h36m.npy not found"):
        real = load_body_model(smpl_dir=tmp_path, data_dir=tmp_path / "no-data")
    assert not real.is_standin and real.provenance["joint_regressor"] == "smpl24-fallback"
    assert "not comparable" in real.provenance["joint_regressor_note"]
    out = real(torch.eye(3).expand(1, 24, 3, 3), torch.zeros(1, 10))
    assert torch.equal(out.joints_h36m, out.joints_smpl[:, list(SMPL24_TO_H36M)])


def test_pkl_refuses_other_classes(tmp_path):
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"v_template": np.zeros(3), "x": warnings.WarningMessage}, protocol=2))
    with pytest.raises(UserError, match="refusing to load class"):
        load_smpl_pkl(bad)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps({"a": np.zeros(100)}, protocol=2)[:50])
    with pytest.raises(UserError, match="truncated.pkl"):
        load_smpl_pkl(truncated)


def test_cli(tmp_path):
    from click.testing import CliRunner
    from occbench.cli import cli
    runner = CliRunner()
    for args in (["body-model", "--help"], ["body-model", "convert", "--help"],
                 ["body-model", "standin", "--help"], ["body-model", "info", "--help"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0 and "Usage" in result.output
    result = runner.invoke(cli, ["body-model", "info", "--smpl-dir", str(standin_dir())])
    assert result.exit_code == 0, result.output
    assert '"standin": true' in result.output and '"faces": 13776' in result.output
    pkl = tmp_path / "model.pkl"
    _fake_smpl_pickle(pkl, 2)
    result = runner.invoke(cli, ["body-model", "convert", str(pkl), str(tmp_path / "model.npz")])
    assert result.exit_code == 0, result.output
    assert load_smpl_file(tmp_path / "model.npz")["J_regressor"].shape == (24, 6890)

"""Dataset readers on tiny files written in each real format: crop geometry, subsets, gendered GT, pelvis,
2D joints in crop px, bad-input messages."""
import pickle
import warnings

import cv2
import numpy as np
import pytest
import torch

from occbench.assets import MissingAssetError
from occbench.body import load_body_model
from occbench.data import BadSample, open_dataset
from occbench.data.crop import bbox_from_keypoints, crop_image, crop_transform, inverse_transform_points, \
    transform_points
from occbench.data.joints import J24_TO_J14
from occbench.errors import UserError
from occbench.standin import standin_dir

W, H = 320, 240


@pytest.fixture(scope="module")
def bodies():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {g: load_body_model(smpl_dir=standin_dir(), gender=g) for g in ("neutral", "male", "female")}


@pytest.fixture(autouse=True)
def _standin_env(monkeypatch):
    # readers load the body with smpl_dir=None: make that the stand-in even on a machine with SMPL files
    monkeypatch.setenv("OCCBENCH_SMPL_DIR", str(standin_dir()))
    monkeypatch.setenv("OCCBENCH_DATA_DIR", str(standin_dir()))
    warnings.simplefilter("ignore")


def gt_lsp(body, pose, betas):
    """Pelvis-subtracted (h36m root) LSP-14 joints and vertices from the body model."""
    out = body.forward_axis_angle(torch.as_tensor(pose, dtype=torch.float32)[None],
                                  torch.as_tensor(betas, dtype=torch.float32)[None])
    pelvis = out.joints_h36m[:, :1]
    return (out.joints_lsp - pelvis)[0].numpy(), (out.vertices - pelvis)[0].numpy(), out


def write_image(path, dot=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((H, W, 3), 40, np.uint8)
    if dot is not None:
        cv2.circle(img, (int(dot[0]), int(dot[1])), 2, (255, 255, 255), -1)
    cv2.imwrite(str(path), img)


# ------------------------------------------------------------------------------------------------ crops
def test_crop_transform_known_values():
    m = crop_transform((160, 120), 1.0, 224)  # box 200 px -> 224 px
    assert np.allclose(m, [[1.12, 0, 224 * (0.5 - 160 / 200)], [0, 1.12, 224 * (0.5 - 120 / 200)]])
    pts = transform_points([[160, 120], [60, 20], [210, 95, 0.7]][:2], (160, 120), 1.0)
    assert np.allclose(pts, [[112, 112], [0, 0]])
    p = transform_points(np.array([[210.0, 95.0, 0.7]]), (160, 120), 1.0)
    assert np.allclose(p, [[168.0, 84.0, 0.7]])  # confidence column kept
    assert np.allclose(inverse_transform_points(p, (160, 120), 1.0), [[210, 95, 0.7]])


@pytest.mark.parametrize("scale", [1.0, 2.5])  # 2.5: 500 px box, the area-averaged path
def test_crop_image_puts_a_dot_where_transform_points_says(scale):
    img = np.zeros((600, 700, 3), np.uint8)
    dot = (402.0, 251.0)
    cv2.circle(img, (int(dot[0]), int(dot[1])), 6, (255, 255, 255), -1)
    center = (380.0, 300.0)
    crop = crop_image(img, center, scale, 224)
    assert crop.shape == (224, 224, 3)
    ys, xs = np.nonzero(crop[..., 0] > 100)
    found = np.array([xs.mean(), ys.mean()])
    expected = transform_points(np.array([dot]), center, scale)[0]
    assert np.abs(found - expected).max() < 0.8
    # outside the image is black
    corner = crop_image(img, (10.0, 10.0), 1.0, 224)
    assert corner[:50, :50].max() == 0


def test_bbox_from_keypoints_factor():
    kp = np.array([[100, 50, 1], [140, 250, 1], [500, 500, 0]], float)  # last one not confident
    center, scale = bbox_from_keypoints(kp, factor=1.2)
    assert np.allclose(center, [120, 150]) and np.isclose(scale, 1.2 * 200 / 200)
    with pytest.raises(ValueError):
        bbox_from_keypoints(np.zeros((3, 3)))


# ------------------------------------------------------------------------------------------------ SPIN npz
SEQS = ["downtown_walking_00", "courtyard_backpack_00", "outdoors_fencing_01", "courtyard_arguing_00"]


def make_spin_3dpw(folder, rng, nan_row=None, drop_image=None):
    """4 samples, one per sequence: test only / OCC only / both / neither."""
    n = len(SEQS)
    names = [f"imageFiles/{s}/image_{i:05d}.png" for i, s in enumerate(SEQS)]
    center = np.array([[160, 120]] * n, float)
    scale = np.ones(n)
    pose = rng.normal(0, 0.2, (n, 72))
    pose[:, :3] = [np.pi, 0, 0]
    shape = rng.normal(0, 1, (n, 10))
    part = np.zeros((n, 24, 3))
    part[:, :, :2] = rng.uniform(80, 240, (n, 24, 2))
    part[:, :, 2] = 1
    part[:, 0] = [210, 95, 1]      # right ankle: a known position
    part[1, 18, 2] = 0              # sample 1: H36M head unlabelled -> LSP top of head stands in
    part[2, 5, 2] = 0               # sample 2: left ankle unlabelled
    if nan_row is not None:
        pose[nan_row, 7] = np.nan
    for i, nm in enumerate(names):
        if i != drop_image:
            write_image(folder / nm, dot=(210, 95))
    path = folder / "3dpw_all_test_with_mmpose.npz"
    np.savez(path, imgname=np.array(names), center=center, scale=scale, pose=pose, shape=shape,
             gender=np.array(["m", "f", "m", "f"]), part=part, openpose=np.zeros((n, 25, 3)))
    return path, dict(names=names, pose=pose, shape=shape, part=part)


def test_spin_npz_geometry_gendered_gt_and_pelvis(tmp_path, bodies):
    path, d = make_spin_3dpw(tmp_path, np.random.default_rng(0))
    ds = open_dataset(path)
    assert len(ds) == 4 and ds.sample_ids[0] == d["names"][0] + "#0"
    assert ds.conventions["pelvis"] == "h36m-root" and ds.conventions["gendered_gt"]
    assert ds.conventions["body_model_standin"] is True
    assert len(ds.provenance["files"][str(path)]["sha256"]) == 64
    s0, s1 = ds[0], ds[1]
    assert s0.crop.shape == (224, 224, 3) and s0.crop.dtype == np.uint8
    # the known GT 2D joint lands at the expected crop pixel, and the crop shows the dot there
    assert np.allclose(s0.joints2d[0], [168.0, 84.0], atol=1e-4) and s0.joints2d_valid.all()
    ys, xs = np.nonzero(s0.crop[..., 0] > 150)
    assert abs(xs.mean() - 168) < 1 and abs(ys.mean() - 84) < 1
    assert np.allclose(s0.joints2d, transform_points(d["part"][0, J24_TO_J14, :2], (160, 120), 1.0), atol=1e-4)
    # head: J24 18 where labelled, else the LSP top of head (13)
    assert np.allclose(s1.joints2d[13], transform_points(d["part"][1, 13:14, :2], (160, 120), 1.0)[0], atol=1e-4)
    assert not ds[2].joints2d_valid[5] and ds[2].joints2d_valid.sum() == 13
    # gendered GT: 'm' -> male body, 'f' -> female body, pelvis (H36M root) subtracted from joints and mesh
    j_m, v_m, _ = gt_lsp(bodies["male"], d["pose"][0], d["shape"][0])
    j_f, _, _ = gt_lsp(bodies["female"], d["pose"][1], d["shape"][1])
    j_n, _, _ = gt_lsp(bodies["neutral"], d["pose"][0], d["shape"][0])
    assert s0.gender == "male" and s1.gender == "female"
    assert np.allclose(s0.joints3d, j_m, atol=1e-5) and np.allclose(s0.vertices, v_m, atol=1e-5)
    assert np.allclose(s1.joints3d, j_f, atol=1e-5)
    assert np.abs(j_n - j_m).max() > 1e-3  # the gendered choice matters
    # neutral GT on request, mid-hip pelvis on request
    assert np.allclose(open_dataset(path, gendered=False)[0].joints3d, j_n, atol=1e-5)
    mid = open_dataset(path, pelvis="mid-hip")[0].joints3d
    assert np.allclose((mid[2] + mid[3]) / 2, 0, atol=1e-6)
    assert np.allclose(mid - mid[2], s0.joints3d - s0.joints3d[2], atol=1e-5)


def test_3dpw_subsets_by_sequence_lists(tmp_path, monkeypatch):
    make_spin_3dpw(tmp_path / "3dpw", np.random.default_rng(1))
    test = open_dataset("3dpw", root=tmp_path / "3dpw")
    occ = open_dataset("3dpw-occ", root=tmp_path / "3dpw")
    seq = lambda ds: [sid.split("/")[1] for sid in ds.sample_ids]  # noqa: E731
    assert seq(test) == ["downtown_walking_00", "outdoors_fencing_01"]
    assert seq(occ) == ["courtyard_backpack_00", "outdoors_fencing_01"]
    assert test.conventions["subset"] == "test" and occ.conventions["subset"] == "occ"
    # env var root: $OCCBENCH_DATASETS_DIR/3dpw
    monkeypatch.setenv("OCCBENCH_DATASETS_DIR", str(tmp_path))
    assert len(open_dataset("3dpw")) == 2


def test_h36m_npz_gt_from_S(tmp_path):
    rng = np.random.default_rng(2)
    n = 2
    S = np.concatenate([rng.normal(0, 0.3, (n, 24, 3)), np.ones((n, 24, 1))], axis=2)
    names = [f"images/S9_Directions.54138969_{i:06d}.jpg" for i in range(n)]
    for nm in names:
        write_image(tmp_path / "h36m" / nm)
    np.savez(tmp_path / "h36m" / "h36m_valid_protocol1.npz", imgname=np.array(names),
             center=np.array([[160, 120]] * n, float), scale=np.ones(n) * 0.9, S=S)
    ds = open_dataset("h36m-p1", root=tmp_path / "h36m")
    s = ds[1]
    assert np.allclose(s.joints3d, S[1, J24_TO_J14, :3] - S[1, 14, :3], atol=1e-6)
    assert s.vertices is None and s.pose is None and s.joints2d is None
    assert "J24 joint 14" in ds.conventions["joints3d_source"]
    mid = open_dataset("h36m-p1", root=tmp_path / "h36m", pelvis="mid-hip")[1].joints3d
    assert np.allclose(mid, S[1, J24_TO_J14, :3] - (S[1, 2, :3] + S[1, 3, :3]) / 2, atol=1e-6)
    with pytest.raises(MissingAssetError, match="h36m_valid_protocol2.npz"):
        open_dataset("h36m-p2", root=tmp_path / "h36m")


# ------------------------------------------------------------------------------------------------ 3DPW pkl
def rot_y(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def test_3dpw_sequence_files(tmp_path, bodies):
    rng = np.random.default_rng(3)
    seq, frames = "downtown_walking_00", 3
    R = rot_y(0.4) @ np.diag([1.0, -1.0, -1.0])
    cam_poses = np.tile(np.eye(4), (frames, 1, 1))
    cam_poses[:, :3, :3] = R
    cam_poses[:, :3, 3] = [0.1, 0.3, 0.5]
    K = np.array([[400.0, 0, 160], [0, 400.0, 120], [0, 0, 1]])
    poses = [rng.normal(0, 0.2, (frames, 72)) for _ in range(2)]
    trans = [np.array([[0.0, -0.9, -4.0]] * frames) + rng.normal(0, 0.05, (frames, 3)) for _ in range(2)]
    kp = np.zeros((frames, 3, 18))
    kp[:, 0] = rng.uniform(120, 200, (frames, 18))
    kp[:, 1] = rng.uniform(60, 200, (frames, 18))
    kp[:, 2] = 0.8
    kp[:, 2, 17] = 0  # unconfident: not in the box
    kp[:, 0, 17] = 1000
    data = {"sequence": seq, "poses": poses, "trans": trans, "betas": [rng.normal(0, 1, 300) for _ in range(2)],
            "genders": ["m", "f"], "cam_poses": cam_poses, "cam_intrinsics": K, "poses2d": [kp, kp + 3],
            "campose_valid": [np.array([1, 1, 0]), np.array([0, 1, 0])], "img_frame_ids": np.arange(frames),
            "jointPositions": [np.zeros((frames, 72))] * 2}
    (tmp_path / "sequenceFiles" / "test").mkdir(parents=True)
    with open(tmp_path / "sequenceFiles" / "test" / f"{seq}.pkl", "wb") as f:
        pickle.dump(data, f, protocol=2)
    for f in range(frames):
        write_image(tmp_path / "imageFiles" / seq / f"image_{f:05d}.jpg")
    ds = open_dataset("3dpw", root=tmp_path)  # no npz: the official sequence files are read
    assert ds.sample_ids == [f"{seq}/image_00000.jpg#0", f"{seq}/image_00001.jpg#0", f"{seq}/image_00001.jpg#1"]
    assert ds.conventions["bbox_factor"] == 1.2 and ds.provenance["reader"] == "3dpw-sequences"
    s = ds[1]  # frame 1, person 0 (male)
    c, sc = bbox_from_keypoints(kp[1].T, 1.2)
    assert np.allclose(s.center, c) and np.isclose(s.scale, sc)
    out = bodies["male"].forward_axis_angle(torch.as_tensor(poses[0][1:2], dtype=torch.float32),
                                            torch.as_tensor(data["betas"][0][None, :10], dtype=torch.float32))
    lsp_cam = (out.joints_lsp[0].numpy() + trans[0][1]) @ R.T + cam_poses[1, :3, 3]
    pelvis_cam = (out.joints_h36m[0, 0].numpy() + trans[0][1]) @ R.T + cam_poses[1, :3, 3]
    assert s.gender == "male"
    assert np.allclose(s.joints3d, lsp_cam - pelvis_cam, atol=1e-4)
    uv = lsp_cam @ K.T
    uv = uv[:, :2] / uv[:, 2:]
    assert np.allclose(s.joints2d, transform_points(uv, c, sc), atol=1e-2) and s.joints2d_valid.all()
    # global orientation turned into the camera frame (the mesh from the stored pose = rotated world mesh)
    j_cam_pose, _, _ = gt_lsp(bodies["male"], s.pose, s.betas)
    assert np.allclose(j_cam_pose, s.joints3d, atol=1e-4)
    assert ds[2].gender == "female"


# ------------------------------------------------------------------------------------------------ HumanData
def test_humandata_npz(tmp_path, bodies):
    rng = np.random.default_rng(4)
    n = 2
    names = [f"imageFiles/downtown_bus_00/image_{i:05d}.jpg" for i in range(n)]
    for nm in names:
        write_image(tmp_path / nm)
    kp = np.zeros((n, 190, 3))
    kp[:, 147] = [150, 40, 1]     # headtop
    kp[:, 2] = [140, 130, 1]      # right_hip (SMPL); right_hip_extra (144) unlabelled
    kp[:, 8] = [138, 200, 1]      # right_ankle
    mask = np.zeros(190)
    mask[[2, 8, 147, 5, 4]] = 1
    smpl = {"body_pose": rng.normal(0, 0.2, (n, 23, 3)), "global_orient": np.array([[np.pi, 0, 0]] * n),
            "betas": rng.normal(0, 1, (n, 10)), "transl": np.zeros((n, 3))}
    path = tmp_path / "pw3d_test_w_kp2d_ds30_op.npz"
    np.savez(path, image_path=np.array(names), bbox_xywh=np.array([[100, 20, 120, 200, 1]] * n, float),
             keypoints2d=kp, keypoints2d_mask=mask, smpl=np.array(smpl, dtype=object),
             meta=np.array({"gender": ["f", "m"]}, dtype=object), config=np.array("pw3d"))
    ds = open_dataset("3dpw-humandata", root=tmp_path)
    s = ds[0]
    assert np.allclose(s.center, [160, 120]) and np.isclose(s.scale, 1.0)
    assert np.allclose(s.joints2d[13], transform_points(np.array([[150, 40]]), (160, 120), 1.0)[0], atol=1e-4)
    assert np.allclose(s.joints2d[2], transform_points(np.array([[140, 130]]), (160, 120), 1.0)[0], atol=1e-4)
    assert s.joints2d_valid.tolist() == [True, False, True] + [False] * 10 + [True]
    pose = np.concatenate([smpl["global_orient"][0], smpl["body_pose"][0].reshape(-1)])
    j_f, _, _ = gt_lsp(bodies["female"], pose, smpl["betas"][0])
    assert s.gender == "female" and np.allclose(s.joints3d, j_f, atol=1e-5)
    assert ds[1].gender == "male"
    # compressed keypoints (only the masked-in columns stored) read the same
    comp = tmp_path / "comp.npz"
    np.savez(comp, image_path=np.array(names), bbox_xywh=np.array([[100, 20, 120, 200, 1]] * n, float),
             keypoints2d=kp[:, mask > 0], keypoints2d_mask=mask, smpl=np.array(smpl, dtype=object),
             meta=np.array({"gender": ["f", "m"]}, dtype=object), __keypoints_compressed__=np.array(True))
    s2 = open_dataset(comp, image_root=tmp_path)[0]
    assert np.allclose(s2.joints2d, s.joints2d) and np.allclose(s2.joints3d, s.joints3d)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_file_and_sample(tmp_path):
    path, d = make_spin_3dpw(tmp_path, np.random.default_rng(5), nan_row=2, drop_image=1)
    ds = open_dataset(path)
    assert ds[0].joints3d is not None  # good samples still load
    with pytest.raises(BadSample) as err:
        ds[1]
    assert d["names"][1] in str(err.value) and "missing" in str(err.value)
    assert err.value.sample_id == ds.sample_ids[1]
    with pytest.raises(BadSample, match="NaN") as err:
        ds[2]
    assert err.value.sample_id == ds.sample_ids[2] and isinstance(err.value, UserError)
    # truncated npz
    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UserError, match="broken.npz.*truncated"):
        open_dataset(broken)
    # missing key
    nokey = tmp_path / "nokey.npz"
    np.savez(nokey, imgname=np.array(d["names"]), scale=np.ones(4))
    with pytest.raises(UserError, match="nokey.npz.*'center'"):
        open_dataset(nokey)
    # wrong shape
    badshape = tmp_path / "badshape.npz"
    np.savez(badshape, imgname=np.array(d["names"]), center=np.zeros((4, 3)), scale=np.ones(4), S=np.zeros((4, 24, 4)))
    with pytest.raises(UserError, match="badshape.npz.*'center'"):
        open_dataset(badshape)
    # missing root says where the data goes and where to get it
    with pytest.raises(MissingAssetError) as err:
        open_dataset("3doh", root=tmp_path / "nowhere")
    assert "3doh_test.npz" in str(err.value) and str(tmp_path / "nowhere") in str(err.value)
    assert "OCCBENCH_DATASETS_DIR" in str(err.value)
    with pytest.raises(UserError, match="neither a known name"):
        open_dataset("no-such-dataset")
    with pytest.raises(UserError, match="unknown dataset option"):
        open_dataset(path, colour="blue")

"""Synthetic stand-in sets: deterministic, SPIN npz format, GT 2D joints on the rendered body, demo set default,
`occbench datasets` commands."""
import json
import os
import warnings

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from occbench.cli.datasets import datasets
from occbench.data import open_dataset
from occbench.data.crop import inverse_transform_points
from occbench.data.synthetic import DEMO_N, JOINT_NOISE, make_synthetic, random_pose
from occbench.standin import standin_dir


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A private cache dir holding the shared stand-in (linked) and a freshly generated demo set."""
    cache = tmp_path_factory.mktemp("cache")
    os.symlink(standin_dir(), cache / "standin")
    old = os.environ.get("OCCBENCH_CACHE_DIR")
    os.environ["OCCBENCH_CACHE_DIR"] = str(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = open_dataset()  # the default dataset: the demo set, generated on first use
    yield cache, ds
    if old is None:
        os.environ.pop("OCCBENCH_CACHE_DIR", None)
    else:
        os.environ["OCCBENCH_CACHE_DIR"] = old


def test_same_seed_same_arrays_and_images(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = make_synthetic(tmp_path / "a", n=3, seed=7)
        b = make_synthetic(tmp_path / "b", n=3, seed=7)
        c = make_synthetic(tmp_path / "c", n=3, seed=8)
    na, nb, nc = (np.load(p / "annotations.npz") for p in (a, b, c))
    assert set(na.files) >= {"imgname", "center", "scale", "pose", "shape", "gender", "has_smpl", "S", "part"}
    for key in na.files:
        assert np.array_equal(na[key], nb[key]), key
    assert not np.array_equal(na["pose"], nc["pose"])
    for name in list(na["imgname"]) + list(na["partname"]):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert na["pose"].shape == (3, 72) and na["S"].shape == (3, 24, 4) and na["part"].shape == (3, 24, 3)
    meta = json.loads((a / "dataset.json").read_text())
    assert meta["seed"] == 7 and meta["n"] == 3 and "synthetic stand-in data" in meta["note"]
    assert meta["body_model"]["standin"] is True and meta["generator_version"]


def test_demo_is_default_and_its_gt_lies_on_the_body(demo_cache):
    cache, ds = demo_cache
    assert ds.name == "demo" and len(ds) == DEMO_N
    assert ds.conventions["synthetic"] and ds.conventions["body_model_standin"]
    ann = np.load(cache / "demo" / "annotations.npz")
    on_body = total = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s.crop.shape == (224, 224, 3) and s.joints3d.shape == (14, 3) and s.vertices.shape == (6890, 3)
        # GT from the body model equals the stored S (same stand-in, same H36M regressor, same root)
        assert np.allclose(s.joints3d, ann["S"][i, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18], :3], atol=1e-5)
        labels = cv2.imread(str(cache / "demo" / ann["partname"][i]), cv2.IMREAD_UNCHANGED)
        assert labels.max() <= 24 and (labels > 0).mean() > 0.03
        xy = np.round(inverse_transform_points(s.joints2d, s.center, s.scale)).astype(int)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < labels.shape[1]) & (xy[:, 1] >= 0) & (xy[:, 1] < labels.shape[0])
        on_body += int((labels[xy[inside, 1], xy[inside, 0]] > 0).sum())
        total += len(xy)
        crop_labels = ds.part_labels(i)
        assert crop_labels.shape == (224, 224) and crop_labels.max() <= 24
        j = np.clip(np.round(s.joints2d).astype(int), 0, 223)
        assert (crop_labels[j[:, 1], j[:, 0]] > 0).mean() >= 0.5
        # the person is centred in the crop and fills a realistic part of it
        assert np.abs(s.joints2d.mean(0) - 112).max() < 45
        assert 80 < np.ptp(s.joints2d[:, 1]) < 224
    assert on_body / total > 0.8, on_body / total
    # the renders show the body where the labels say (not background)
    img = cv2.imread(str(cache / "demo" / ann["imgname"][0]))
    assert img.shape == (256, 256, 3)


def test_datasets_cli(demo_cache, tmp_path):
    runner = CliRunner()
    res = runner.invoke(datasets, ["list"])
    assert res.exit_code == 0 and "demo" in res.output and "3dpw-occ" in res.output
    out = tmp_path / "s.png"
    res = runner.invoke(datasets, ["show", "demo", "--index", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert cv2.imread(str(out)).shape == (448, 448, 3)
    assert json.loads(res.output)["sample_id"] == "images/000002.jpg#0"
    res = runner.invoke(datasets, ["make-synthetic", "--n", "2", "--out", str(tmp_path / "syn"), "--seed", "3",
                                   "--limb-swing", "0.2"])
    assert res.exit_code == 0, res.output
    assert len(open_dataset(str(tmp_path / "syn"))) == 2
    meta = json.loads((tmp_path / "syn" / "dataset.json").read_text())
    assert meta["pose_variation"] == {"limb_swing": 0.2, "joint_noise": JOINT_NOISE}
    for cmd in ("list", "make-demo", "make-synthetic", "show"):
        assert runner.invoke(datasets, [cmd, "--help"]).exit_code == 0


def test_stale_demo_cache_is_regenerated(demo_cache):
    """A demo set rendered with another body (an older stand-in, or SMPL vs stand-in) has ground truth from
    that body: it must not be reused once the body changes."""
    from occbench.data.synthetic import ensure_demo
    cache, _ = demo_cache
    meta_path = cache / "demo" / "dataset.json"
    meta = json.loads(meta_path.read_text())
    assert ensure_demo() == cache / "demo" and json.loads(meta_path.read_text()) == meta   # valid: kept
    stale = dict(meta, body_model=dict(meta["body_model"], sha256={"smpl": "0" * 64}))
    meta_path.write_text(json.dumps(stale))
    ann_before = np.load(cache / "demo" / "annotations.npz")["S"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = ensure_demo()
    assert json.loads((folder / "dataset.json").read_text())["body_model"] == meta["body_model"]
    assert np.array_equal(np.load(folder / "annotations.npz")["S"], ann_before)   # same body -> same set
    # a set with another pose variation (older defaults) is not the demo set either
    meta_path.write_text(json.dumps(dict(meta, pose_variation={"limb_swing": 0.0, "joint_noise": 0.12})))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = ensure_demo()
    assert json.loads((folder / "dataset.json").read_text())["pose_variation"] == meta["pose_variation"]


def test_limb_swing_sets_the_spread_of_the_arms_and_keeps_them_out_of_the_torso():
    def poses(limb_swing):
        rng = np.random.default_rng(0)
        return np.stack([random_pose(rng, limb_swing=limb_swing, joint_noise=0.0)[0] for _ in range(400)])

    still, swung, wide = poses(0.0), poses(0.45), poses(0.9)
    left_shoulder_z, left_hip_z, right_hip_z = 16 * 3 + 2, 1 * 3 + 2, 2 * 3 + 2
    swing = [np.abs(p[:, left_shoulder_z] - still[:, left_shoulder_z]).mean() for p in (swung, wide)]
    assert 0.2 < swing[0] < swing[1]                       # ~0.45 * sqrt(2 / pi), less where clipped
    assert np.abs(swung[:, 4 * 3:4 * 3 + 3] - still[:, 4 * 3:4 * 3 + 3]).max() == 0   # knees do not swing
    for p in (swung, wide):
        assert p[:, left_shoulder_z].min() >= -1.3 and p[:, 17 * 3 + 2].max() <= 1.3   # never into the torso
        # hips only abduct: the swing moves the left leg to +z and the right leg to -z of the still pose
        assert (p[:, left_hip_z] >= still[:, left_hip_z] - 1e-12).all()
        assert (p[:, right_hip_z] <= still[:, right_hip_z] + 1e-12).all()

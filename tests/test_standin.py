"""The procedural stand-in body: exact SMPL format, closed genus-0 person-shaped mesh, deterministic."""
import numpy as np
import pytest
import trimesh

from occbench.standin import (NUM_FACES, NUM_VERTS, SMPL_PARENTS, STANDIN_FILES, rest_joints, standin_dir,
                              write_standin)
from occbench.smpl_io import load_smpl_file


@pytest.fixture(scope="module")
def folder():
    return standin_dir()


def test_files_and_exact_shapes(folder):
    for name in STANDIN_FILES:
        assert (folder / name).is_file(), name
    for gender in ("NEUTRAL", "MALE", "FEMALE"):
        data = load_smpl_file(folder / f"SMPL_{gender}.npz")
        assert data["v_template"].shape == (NUM_VERTS, 3)
        assert data["f"].shape == (NUM_FACES, 3) and data["f"].min() == 0 and data["f"].max() == NUM_VERTS - 1
        assert data["weights"].shape == (NUM_VERTS, 24)
        assert np.allclose(data["weights"].sum(1), 1.0) and data["weights"].min() >= 0
        assert data["J_regressor"].shape == (24, NUM_VERTS)
        assert np.allclose(data["J_regressor"].sum(1), 1.0) and data["J_regressor"].min() >= 0
        assert data["shapedirs"].shape == (NUM_VERTS, 3, 10)
        assert data["posedirs"].shape == (NUM_VERTS, 3, 207)
        assert list(data["kintree_table"][0, 1:]) == list(SMPL_PARENTS[1:])
        assert list(data["kintree_table"][1]) == list(range(24))
    assert np.load(folder / "J_regressor_h36m.npy").shape == (17, NUM_VERTS)
    assert np.load(folder / "J_regressor_extra.npy").shape == (9, NUM_VERTS)
    mean = np.load(folder / "smpl_mean_params.npz")
    assert mean["pose"].shape == (144,) and mean["shape"].shape == (10,) and mean["cam"].shape == (3,)
    assert "NOT comparable" in (folder / "STANDIN.txt").read_text()


def test_closed_genus0_single_body(folder):
    data = np.load(folder / "SMPL_NEUTRAL.npz")
    mesh = trimesh.Trimesh(data["v_template"], data["f"], process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.euler_number == 2
    assert len(mesh.split(only_watertight=False)) == 1
    assert mesh.volume > 0.03  # outward normals; an adult body is ~0.06-0.08 m^3
    height = np.ptp(data["v_template"][:, 1])
    assert 1.6 < height < 1.9
    # the T-pose arm span is about the height, as in SMPL
    assert 1.5 < np.ptp(data["v_template"][:, 0]) < 1.9


def test_regressed_joints_near_skeleton(folder):
    data = np.load(folder / "SMPL_NEUTRAL.npz")
    joints = data["J_regressor"] @ data["v_template"]
    assert np.abs(joints - rest_joints()).max() < 0.01


def test_deterministic(folder, tmp_path):
    write_standin(tmp_path)
    for name in STANDIN_FILES:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name


def test_gendered_templates_differ(folder):
    neutral = np.load(folder / "SMPL_NEUTRAL.npz")["v_template"]
    male = np.load(folder / "SMPL_MALE.npz")["v_template"]
    female = np.load(folder / "SMPL_FEMALE.npz")["v_template"]
    assert np.ptp(male[:, 1]) > np.ptp(neutral[:, 1]) > np.ptp(female[:, 1])

"""Occlusion sensitivity meshes: transfer of window errors to visible vertices, pooling, export."""
import numpy as np
import pytest
import trimesh

from occbench.sensmesh import (DepthRenderer, SensitivityAccumulator, export_mesh, project, render_views,
                               visible_vertices)


def test_accumulator_transfers_window_errors_to_covered_visible_vertices():
    pixels = np.array([[10.0, 10.0], [50.0, 10.0], [10.0, 50.0], [10.0, 10.0]])
    visible = np.array([True, True, True, False])
    boxes = np.array([[0, 0, 40, 40], [0, 0, 224, 224]], dtype=float)  # window 0 covers vertex 0 only
    errors = np.array([[100.0, np.nan], [10.0, 20.0]])                  # panel 1: no value for window 0
    acc = SensitivityAccumulator.empty(4, 2)
    acc.add(pixels, visible, boxes, errors)
    mean = acc.mean()
    assert mean[0, 0] == pytest.approx(55.0)       # (100 + 10) / 2
    assert mean[1, 0] == pytest.approx(10.0)
    assert mean[0, 1] == pytest.approx(20.0)       # NaN window skipped for that panel
    assert np.isnan(mean[3]).all()                 # hidden vertex never receives an error
    other = SensitivityAccumulator.empty(4, 2)
    other.add(pixels, visible, boxes[:1], np.array([[0.0, 0.0]]))
    acc.merge(other)
    assert acc.mean()[0, 0] == pytest.approx(110.0 / 3)


def _plane(z, half=0.5, n=5):
    xs = np.linspace(-half, half, n)
    grid = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    return np.concatenate([grid, np.full((len(grid), 1), z)], 1)


def _grid_faces(n, offset):
    faces = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b = offset + i * n + j, offset + i * n + j + 1
            c, d = a + n, b + n
            faces += [[a, b, c], [b, d, c]]
    return faces


def test_depth_test_hides_the_surface_behind():
    n = 5
    points = np.concatenate([_plane(40.0, n=n), _plane(41.0, n=n)])   # same square, 1 m further back
    renderer = DepthRenderer(np.array(_grid_faces(n, 0) + _grid_faces(n, n * n)))
    try:
        depth = renderer.depth(points)
    finally:
        renderer.close()
    visible = visible_vertices(points, depth, depth_tolerance=0.02)
    inside = ((project(points) >= 1) & (project(points) < 223)).all(1)
    assert inside[: n * n].sum() >= 9
    assert visible[: n * n][inside[: n * n]].all()
    assert not visible[n * n:][inside[n * n:]].any()


def test_export_and_render(tmp_path):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    values = np.linspace(0, 100, len(mesh.vertices))
    values[0] = np.nan
    files = export_mesh(mesh.vertices, mesh.faces, values, 0, 100, tmp_path / "m")
    ply = trimesh.load(files["ply"], process=False)
    assert len(ply.vertices) == len(mesh.vertices)
    raw = ply.metadata["_ply_raw"]["vertex"]["data"]["error_mm"]
    assert raw[-1] == pytest.approx(100.0) and raw[0] == -1.0
    glb = trimesh.load(files["glb"])
    geom = list(glb.geometry.values())[0]
    assert "_error_mm" in geom.vertex_attributes
    png = render_views(mesh.vertices, mesh.faces, values, 0, 100, tmp_path / "m.png", title="t")
    from matplotlib.image import imread
    image = imread(png)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.05

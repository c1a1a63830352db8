"""Occlusion sensitivity meshes (PARE Sec. 3, Fig. 3 and 5). PARE released no code; this is occbench's method.

1. Mesh: the model's *clean* prediction for each sample (PARE: "overlay the estimated body on the
   heatmap"), placed in the crop with the predicted weak-perspective camera (f = 5000, REFERENCE 1).
2. Visibility: a vertex is visible when its depth is within ``depth_tolerance`` (m) of the rendered depth
   buffer of that same mesh at the vertex's pixel (a z-buffer test, pyrender offscreen).
3. Transfer: a window's error (per joint, and the joint mean) reaches every visible vertex whose projection
   lies inside the window's occluder box.
4. Pooling: per vertex, the mean over every (sample, window) that covered it while visible. Vertices never
   covered are NaN (drawn gray).
The pooled values are shown on the neutral template mesh (zero pose, zero shape), one mesh per joint plus
the mean, on one fixed colour range for all models compared.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from occbench.camera import FOCAL_LENGTH, weak_perspective_to_translation
from occbench.heatmaps import ERROR_CMAP

CROP = 224


@dataclass
class SensitivityAccumulator:
    """Running per-vertex sums; ``add`` one sample at a time, ``mean()`` at the end.

    sums, counts: (V,P) error sums and numbers of covering windows for P panels (joints + mean).
    """

    sums: np.ndarray
    counts: np.ndarray

    @classmethod
    def empty(cls, num_vertices: int, num_panels: int) -> "SensitivityAccumulator":
        return cls(np.zeros((num_vertices, num_panels)), np.zeros((num_vertices, num_panels)))

    def add(self, pixels: np.ndarray, visible: np.ndarray, boxes: np.ndarray, errors: np.ndarray) -> None:
        """pixels: (V,2) vertex projections in crop px; visible: (V,) bool; boxes: (W,4) x0,y0,x1,y1 (x1,y1
        exclusive); errors: (W,P) per-window errors in mm, NaN where a panel has no value for that window
        (e.g. the joint was not visible)."""
        x, y = pixels[:, 0], pixels[:, 1]
        inside = ((x[None] >= boxes[:, 0:1]) & (x[None] < boxes[:, 2:3]) &
                  (y[None] >= boxes[:, 1:2]) & (y[None] < boxes[:, 3:4]) & visible[None])  # (W,V)
        errors = np.asarray(errors, dtype=np.float64)
        valid = np.isfinite(errors)
        self.sums += inside.T.astype(np.float64) @ np.where(valid, errors, 0.0)
        self.counts += inside.T.astype(np.float64) @ valid.astype(np.float64)

    def merge(self, other: "SensitivityAccumulator") -> None:
        self.sums += other.sums
        self.counts += other.counts

    def mean(self) -> np.ndarray:
        """(V,P) pooled mean error per vertex; NaN where no window ever covered the vertex."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.sums / self.counts
        out[self.counts == 0] = np.nan
        return out


def camera_frame_vertices(vertices: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """(V,3) body-frame vertices + weak-perspective cam (3,) -> (V,3) camera-frame vertices (y down, z forward)."""
    import torch
    trans = weak_perspective_to_translation(torch.tensor(np.array(cam), dtype=torch.float64)[None])[0].numpy()
    return np.asarray(vertices, dtype=np.float64) + trans


def project(points_cam: np.ndarray, crop_size: int = CROP) -> np.ndarray:
    return FOCAL_LENGTH * points_cam[:, :2] / points_cam[:, 2:3] + crop_size / 2.0


class DepthRenderer:
    """Depth buffer of a mesh seen by the crop's camera (pyrender, headless EGL)."""

    def __init__(self, faces: np.ndarray, crop_size: int = CROP):
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
        import pyrender
        self._pyrender = pyrender
        self.faces = np.asarray(faces)
        self.crop_size = crop_size
        self.renderer = pyrender.OffscreenRenderer(crop_size, crop_size)

    def depth(self, points_cam: np.ndarray) -> np.ndarray:
        import trimesh
        pyrender = self._pyrender
        gl = points_cam * np.array([1.0, -1.0, -1.0])  # OpenGL looks down -z with y up
        # double-sided: the depth test must not depend on the mesh's face winding
        material = pyrender.MetallicRoughnessMaterial(doubleSided=True)
        mesh = pyrender.Mesh.from_trimesh(trimesh.Trimesh(gl, self.faces, process=False), material=material,
                                          smooth=False)
        scene = pyrender.Scene()
        scene.add(mesh)
        zmin, zmax = points_cam[:, 2].min(), points_cam[:, 2].max()
        camera = pyrender.IntrinsicsCamera(fx=FOCAL_LENGTH, fy=FOCAL_LENGTH, cx=self.crop_size / 2,
                                           cy=self.crop_size / 2, znear=max(zmin - 1.0, 0.01), zfar=zmax + 1.0)
        scene.add(camera, pose=np.eye(4))
        # pyrender's DEPTH_ONLY pass culls back faces whatever the flags say, so render colour + depth
        return self.renderer.render(scene, flags=pyrender.RenderFlags.SKIP_CULL_FACES)[1]

    def close(self):
        self.renderer.delete()


def visible_vertices(points_cam: np.ndarray, depth: np.ndarray, depth_tolerance: float = 0.02) -> np.ndarray:
    """(V,) bool: the vertex projects inside the crop and is not behind the rendered surface.

    The surface depth at a vertex is the nearest rendered depth in its 3x3 pixel neighbourhood, so vertices on
    the silhouette (whose own pixel may fall just outside the rasterized triangles) still count as visible.
    """
    from scipy.ndimage import minimum_filter
    nearest = minimum_filter(np.where(depth > 0, depth, np.inf), size=3, mode="nearest")
    pix = project(points_cam, depth.shape[0])
    u, v = np.floor(pix[:, 0]).astype(int), np.floor(pix[:, 1]).astype(int)
    inside = (u >= 0) & (v >= 0) & (u < depth.shape[1]) & (v < depth.shape[0])
    surface = np.full(len(points_cam), np.inf)
    surface[inside] = nearest[v[inside], u[inside]]
    return inside & np.isfinite(surface) & (points_cam[:, 2] <= surface + depth_tolerance)


def value_colors(values: np.ndarray, vmin: float, vmax: float, cmap: str = ERROR_CMAP) -> np.ndarray:
    """(V,) values -> (V,4) uint8 RGBA on a fixed range; NaN -> gray."""
    import matplotlib
    colors = matplotlib.colormaps[cmap](np.clip((values - vmin) / max(vmax - vmin, 1e-9), 0, 1))
    colors = (colors * 255).astype(np.uint8)
    colors[~np.isfinite(values)] = (160, 160, 160, 255)
    return colors


def export_mesh(vertices: np.ndarray, faces: np.ndarray, values: np.ndarray, vmin: float, vmax: float,
                path_stem) -> dict:
    """Write ``<stem>.ply`` and ``<stem>.glb`` with per-vertex colours and the scalar ``error_mm``."""
    import trimesh
    mesh = trimesh.Trimesh(vertices, faces, vertex_colors=value_colors(values, vmin, vmax), process=False)
    mesh.vertex_attributes["error_mm"] = np.nan_to_num(values, nan=-1.0).astype(np.float32)
    ply, glb = f"{path_stem}.ply", f"{path_stem}.glb"
    with open(ply, "wb") as f:
        f.write(trimesh.exchange.ply.export_ply(mesh, include_attributes=True))
    with open(glb, "wb") as f:
        f.write(trimesh.exchange.gltf.export_glb(mesh))
    return {"ply": ply, "glb": glb}


def render_views(vertices: np.ndarray, faces: np.ndarray, values: np.ndarray, vmin: float, vmax: float,
                 out_png, title: str = "", size: int = 320) -> str:
    """Front and back renders of the coloured mesh side by side, with a colour bar in mm."""
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyrender
    import trimesh

    colors = value_colors(values, vmin, vmax)
    centre = (vertices.max(0) + vertices.min(0)) / 2
    height = float(np.ptp(vertices[:, 1]))
    renderer = pyrender.OffscreenRenderer(size, size)
    images = []
    try:
        for yaw in (0.0, np.pi):
            rot = trimesh.transformations.rotation_matrix(yaw, [0, 1, 0])[:3, :3]
            verts = (vertices - centre) @ rot.T
            mesh = trimesh.Trimesh(verts, faces, vertex_colors=colors, process=False)
            scene = pyrender.Scene(ambient_light=np.full(3, 0.45), bg_color=np.ones(4))
            scene.add(pyrender.Mesh.from_trimesh(mesh, smooth=True))
            pose = np.eye(4)
            pose[2, 3] = 1.6 * height
            scene.add(pyrender.PerspectiveCamera(yfov=np.deg2rad(40)), pose=pose)
            scene.add(pyrender.DirectionalLight(intensity=2.5), pose=pose)
            images.append(renderer.render(scene)[0])
    finally:
        renderer.delete()
    fig, axes = plt.subplots(1, 2, figsize=(5.2, 3.4))
    for ax, image, label in zip(axes, images, ("front", "back")):
        ax.imshow(image)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    mappable = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(vmin, vmax), cmap=ERROR_CMAP)
    fig.colorbar(mappable, ax=axes, fraction=0.04, pad=0.02).set_label("mean joint error (mm)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(out_png, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return str(out_png)


def sample_boxes(windows) -> np.ndarray:
    """(W,4) x0, y0, x1, y1 in 224-crop px (x1, y1 exclusive, clipped to the crop) from window rows."""
    x0 = windows["x0"].to_numpy(dtype=np.float64)
    y0 = windows["y0"].to_numpy(dtype=np.float64)
    size = windows["size"].to_numpy(dtype=np.float64)
    return np.stack([np.clip(x0, 0, CROP), np.clip(y0, 0, CROP),
                     np.clip(x0 + size, 0, CROP), np.clip(y0 + size, 0, CROP)], axis=1)


def accumulate_run(run, body_model, predictions, joint_names, depth_tolerance: float = 0.02,
                   metric: str = "mpjpe") -> SensitivityAccumulator:
    """Pool a sliding-window run's errors onto the vertices of each sample's clean predicted mesh.

    predictions: DataFrame with sample_index, rotmat (216 floats), betas (10), cam (3) of the clean copy.
    Panels: one per joint in ``joint_names`` order, then the mean over the window's visible joints.
    """
    import torch
    rows = run.joints[(run.joints["window"] >= 0) & run.joints["visible"]]
    faces = np.asarray(body_model.faces)
    acc = SensitivityAccumulator.empty(body_model_num_vertices(body_model), len(joint_names) + 1)
    renderer = DepthRenderer(faces)
    try:
        by_sample = dict(tuple(rows.groupby("sample_index")))
        preds = predictions[predictions["sample_index"].isin(list(by_sample))]
        for _, pred in preds.iterrows():
            part = by_sample[pred["sample_index"]]
            rotmat = torch.as_tensor(np.array(pred["rotmat"], dtype=np.float32)).view(1, 24, 3, 3)
            betas = torch.as_tensor(np.array(pred["betas"], dtype=np.float32)).view(1, -1)
            with torch.inference_mode():
                verts = body_model(rotmat=rotmat, betas=betas).vertices[0].double().numpy()
            points = camera_frame_vertices(verts, np.asarray(pred["cam"], dtype=np.float64))
            visible = visible_vertices(points, renderer.depth(points), depth_tolerance)
            per_joint = part.pivot_table(index="window", columns="joint", values=metric, aggfunc="mean")
            per_joint = per_joint.reindex(columns=range(len(joint_names)))
            mean = part.groupby("window")[metric].mean()
            windows = part.groupby("window")[["x0", "y0", "size"]].first().loc[per_joint.index]
            errors = np.concatenate([per_joint.to_numpy(), mean.loc[per_joint.index].to_numpy()[:, None]], 1)
            acc.add(project(points), visible, sample_boxes(windows), errors)
    finally:
        renderer.close()
    return acc


def body_model_num_vertices(body_model) -> int:
    return int(np.asarray(body_model.faces).max()) + 1

"""Synthetic datasets rendered from the stand-in body, written in the SPIN npz format.

:func:`make_synthetic` poses the body model (by default the stand-in: no licensed file needed) in small random
perturbations of a few natural poses (standing, walking, arms raised, sitting-ish, reaching), turns it to face
the camera within +/- 60 deg of yaw, varies its shape, colours its parts like clothes (shirt, trousers, skin,
shoes, hair), and renders it with pyrender (headless EGL, perspective camera) over a textured background
(procedural textures or scikit-image's bundled photographs). Output folder::

    dataset.json          provenance: generator version, seed, n, camera, 'synthetic stand-in data'
    annotations.npz       SPIN format: imgname, center, scale, pose (72, camera frame), shape (10), gender 'n',
                          has_smpl, S (24,4) root-centred 3D joints, part (24,3) 2D joints (image px, 1 = known)
    images/000000.jpg     RGB renders (image_size x image_size)
    parts/000000.png      per-pixel part label: 0 background, 1..24 = SMPL part (vertex_part_labels) + 1

The camera frame is OpenCV's (x right, y down, z forward), like 3DPW's camera-frame poses; the person box is
the 2D joint box enlarged 1.2x (recorded), as in SPIN's 3DPW preprocessing.
The demo set (``open_dataset("demo")``) is ``make_synthetic(n=32, seed=DEMO_SEED)`` written once into
``occbench.assets.cache_dir()/demo``. Same seed -> same arrays and images.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from occbench.data.crop import DEFAULT_BBOX_FACTOR, bbox_from_keypoints
from occbench.data.joints import H36M_TO_J14

GENERATOR_VERSION = "occbench-synthetic-2"
DEMO_SEED = 20240611
DEMO_N = 32
IMAGE_SIZE = 256
FOCAL = 560.0

# SMPL joints: 1/2 L/R hip, 4/5 knees, 7/8 ankles, 3/6/9 spine, 12 neck, 15 head, 16/17 shoulders,
# 18/19 elbows, 20/21 wrists. Body frame: y up, +x = the body's left, faces +z.
# Hip flexion (leg forward) is a negative x rotation, knee flexion positive; a left arm (along +x) goes down
# with a negative z rotation, a right arm with a positive one.
_BASE_POSES = {
    "standing": {16: (0, 0, -1.15), 17: (0, 0, 1.15), 18: (0, -0.2, 0), 19: (0, 0.2, 0)},
    "walking": {1: (-0.45, 0, 0.03), 2: (0.3, 0, -0.03), 4: (0.25, 0, 0), 5: (0.6, 0, 0),
                16: (0, 0.35, -1.2), 17: (0, 0.35, 1.2), 18: (0, -0.5, 0), 19: (0, 0.3, 0)},
    "arms_raised": {16: (0, 0, 0.9), 17: (0, 0, -0.9), 18: (0, -0.3, 0.2), 19: (0, 0.3, -0.2),
                    1: (0, 0, 0.12), 2: (0, 0, -0.12)},
    "sitting": {1: (-1.25, 0, 0.1), 2: (-1.25, 0, -0.1), 4: (1.35, 0, 0), 5: (1.35, 0, 0),
                16: (0, -0.6, -1.0), 17: (0, 0.6, 1.0), 18: (0, -0.9, 0), 19: (0, 0.9, 0), 3: (0.15, 0, 0)},
    "reaching": {17: (0, 1.2, 0.3), 19: (0, 0.3, 0), 16: (0, 0, -1.1), 18: (0, -0.4, 0),
                 1: (-0.2, 0, 0), 5: (0.15, 0, 0), 6: (0.1, 0, 0)},
}
# Clothing groups over SMPL parts.
_GROUPS = {"shirt": (3, 6, 9, 13, 14, 16, 17), "sleeve_or_skin": (18, 19), "trousers": (0, 1, 2, 4, 5),
           "shoes": (7, 8, 10, 11), "skin": (12, 20, 21, 22, 23), "head": (15,)}
_SKIN = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.52], [0.71, 0.51, 0.37], [0.48, 0.33, 0.23],
                  [0.93, 0.76, 0.62]])
_BACKGROUND_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "horse",
                      "moon", "rocket", "clock", "immunohistochemistry", "hubble_deep_field", "text", "page")


# Pose variation of the synthetic sets (recorded in dataset.json): see random_pose.
LIMB_SWING = 0.45
JOINT_NOISE = 0.06
_SWING_SCALE = np.zeros(24)
_SWING_SCALE[[16, 17]] = 1.0      # shoulders
_SWING_SCALE[[18, 19]] = 0.7      # elbows
_SWING_SCALE[[13, 14]] = 0.2      # collars
_HIP_SWING_SCALE = 0.6           # hips: outwards only (see random_pose)


def _rodrigues(aa: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    return Rotation.from_rotvec(aa).as_matrix()


def _aa_from_matrix(rot: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    return Rotation.from_matrix(rot).as_rotvec()


def random_pose(rng: np.random.Generator, limb_swing: float = LIMB_SWING,
                joint_noise: float = JOINT_NOISE) -> tuple[np.ndarray, str]:
    """(72,) axis-angle in the camera frame (global orient first) and the base pose's name.

    limb_swing: std (rad) of the frontal-plane swing of shoulders, elbows and hips (rotation about the body's
    forward axis): large and visible, so a hidden limb really is unknown. joint_noise: std (rad) of small
    rotations of every joint about all three axes (their depth part is barely visible at demo resolution).
    """
    names = list(_BASE_POSES)
    name = names[rng.integers(len(names))]
    body = np.zeros((24, 3))
    for joint, aa in _BASE_POSES[name].items():
        body[joint] = aa
    # a second pose blended in a little, then joint noise (smaller on the spine)
    other = _BASE_POSES[names[rng.integers(len(names))]]
    mix = rng.uniform(0, 0.3)
    for joint, aa in other.items():
        body[joint] = (1 - mix) * body[joint] + mix * np.asarray(aa)
    noise = rng.normal(0, joint_noise, (24, 3))
    noise[[3, 6, 9, 12, 15]] *= 0.5
    noise[[10, 11, 22, 23]] *= 0.3
    swing = rng.normal(0, limb_swing, 24)
    # hips only swing outwards (+z abducts the left leg, -z the right); arms up or down, never into the torso
    noise[:, 2] += swing * _SWING_SCALE
    noise[1, 2] += abs(swing[1]) * _HIP_SWING_SCALE
    noise[2, 2] -= abs(swing[2]) * _HIP_SWING_SCALE
    body[1:] += noise[1:]
    body[16, 2] = max(body[16, 2], -1.3)
    body[17, 2] = min(body[17, 2], 1.3)
    yaw = np.deg2rad(rng.uniform(-60, 60))
    pitch, roll = np.deg2rad(rng.normal(0, 5, 2))
    # OpenCV camera frame: turn the y-up body upside down about x (so it stands upright with y down) and
    # facing the camera (-z), then yaw it about the vertical axis.
    facing = _rodrigues(np.array([np.pi, 0, 0]))
    turn = _rodrigues(np.array([0, -yaw, 0])) @ _rodrigues(np.array([pitch, 0, roll]))
    body[0] = _aa_from_matrix(turn @ facing)
    return body.reshape(72), name


def _procedural_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    import cv2

    kind = rng.integers(4)
    base = rng.uniform(0.15, 0.9, 3)
    other = rng.uniform(0.15, 0.9, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    if kind == 0:  # blurred multi-scale noise
        img = np.zeros((size, size), np.float32)
        for cells in (4, 16, 64):
            layer = rng.random((cells, cells)).astype(np.float32)
            img += cv2.resize(layer, (size, size), interpolation=cv2.INTER_CUBIC) / 3
        t = np.clip(img, 0, 1)[..., None]
    elif kind == 1:  # stripes
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.05, 0.25)
        t = (0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period))[..., None]
    elif kind == 2:  # checks
        cells = rng.integers(3, 12)
        t = (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2).astype(np.float32)[..., None]
    else:  # floor/wall split with a gradient
        horizon = rng.uniform(0.4, 0.75)
        t = np.where(yy > horizon, 1.0, yy / horizon * 0.6)[..., None].astype(np.float32)
    t = t.astype(np.float32)
    img = base.astype(np.float32) * (1 - t) + other.astype(np.float32) * t
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


_PHOTO_CACHE: dict = {}


def _photo(name: str) -> np.ndarray | None:
    if name not in _PHOTO_CACHE:
        try:
            import skimage.data
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo that needs a download is skipped: procedural textures remain
            img = None
        if img is not None:
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            img = img[..., :3]
            if img.dtype != np.uint8:
                img = (np.clip(img / max(img.max(), 1e-9), 0, 1) * 255).astype(np.uint8)
        _PHOTO_CACHE[name] = img
    return _PHOTO_CACHE[name]


def random_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size,size,3) uint8: a random crop of a bundled photograph (60%) or a procedural texture."""
    import cv2

    if rng.random() < 0.6:
        img = _photo(_BACKGROUND_PHOTOS[rng.integers(len(_BACKGROUND_PHOTOS))])
        if img is not None:
            h, w = img.shape[:2]
            side = int(rng.uniform(0.4, 1.0) * min(h, w))
            y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            out = cv2.resize(img[y0:y0 + side, x0:x0 + side], (size, size), interpolation=cv2.INTER_AREA)
            if rng.random() < 0.5:
                out = out[:, ::-1]
            tint = rng.uniform(0.75, 1.15, 3)
            return np.clip(out * tint, 0, 255).astype(np.uint8)
    return _procedural_texture(rng, size)


def random_part_colors(rng: np.random.Generator) -> np.ndarray:
    """(24,3) float RGB in [0,1]: one clothing palette per person."""
    skin = _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.93, 1.05)
    shirt = rng.uniform(0.05, 0.95, 3)
    trousers = rng.uniform(0.05, 0.6, 3)
    shoes = rng.uniform(0.02, 0.35) * np.ones(3) + rng.uniform(0, 0.15, 3)
    hair = np.array([0.1, 0.07, 0.05]) * rng.uniform(0.6, 3.0)
    colors = np.zeros((24, 3))
    for joints, color in ((_GROUPS["shirt"], shirt), (_GROUPS["trousers"], trousers), (_GROUPS["shoes"], shoes),
                          (_GROUPS["skin"], skin), (_GROUPS["head"], hair if rng.random() < 0.25 else skin),
                          (_GROUPS["sleeve_or_skin"], shirt if rng.random() < 0.5 else skin)):
        for j in joints:
            colors[j] = color
    # faint per-part variation so adjacent parts of one garment stay distinguishable
    colors = colors * rng.uniform(0.9, 1.1, (24, 1))
    return np.clip(colors, 0, 1)


class _Renderer:
    """One pyrender offscreen renderer reused for every image, one flat (unlit) pass per image.

    The pass writes, per pixel, the part code in red (10 * (part + 1)) and the smooth vertex normal's x, y in
    green/blue; shading is then computed in numpy (Lambert + ambient) from those normals. One raster pass
    instead of a lit pass plus a label pass halves the cost on a software (llvmpipe) GL.
    """

    def __init__(self, faces: np.ndarray, part_of_vertex: np.ndarray, size: int, focal: float):
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
        import pyrender

        self.pyrender = pyrender
        self.size, self.focal = size, focal
        self.faces = np.asarray(faces, np.int64)
        # a face belongs to the part most of its vertices belong to
        fl = part_of_vertex[self.faces]
        self.face_part = np.where(fl[:, 1] == fl[:, 2], fl[:, 1], fl[:, 0])
        self.code = np.repeat(((self.face_part + 1) * 10 / 255.0), 3)
        self.indices = np.arange(3 * len(self.faces)).reshape(-1, 3)
        # vertex-face incidence: vertex normal = sum of the (area-weighted) normals of its faces
        import scipy.sparse
        rows = self.faces.reshape(-1)
        cols = np.repeat(np.arange(len(self.faces)), 3)
        self.incidence = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)),
                                                 shape=(int(self.faces.max()) + 1, len(self.faces)))
        self.renderer = pyrender.OffscreenRenderer(size, size)
        self.camera = pyrender.IntrinsicsCamera(fx=focal, fy=focal, cx=size / 2, cy=size / 2, znear=0.05,
                                                zfar=100.0)

    def _vertex_normals(self, verts: np.ndarray) -> np.ndarray:
        tri = verts[self.faces]
        fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        vn = self.incidence @ fn
        return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)

    def render(self, vertices_cv: np.ndarray):
        """vertices (6890,3) in the OpenCV camera frame -> (labels (S,S) uint8 0..24, normals (S,S,3) OpenCV
        frame, coverage (S,S) float in [0,1])."""
        pyrender = self.pyrender
        gl = vertices_cv * np.array([1.0, -1.0, -1.0])  # OpenCV -> OpenGL camera frame
        normals = self._vertex_normals(gl)[self.faces].reshape(-1, 3)
        colors = np.stack([self.code, 0.5 + 0.5 * normals[:, 0], 0.5 + 0.5 * normals[:, 1],
                           np.ones(len(self.code))], axis=1)
        # unshared vertices: a face's part code is never blended with its neighbour's
        prim = pyrender.Primitive(positions=gl[self.faces].reshape(-1, 3).astype(np.float32),
                                  indices=self.indices, color_0=colors.astype(np.float32))
        scene = pyrender.Scene(bg_color=[0, 0, 0, 0], ambient_light=[1.0, 1.0, 1.0])
        scene.add(pyrender.Mesh([prim]))
        scene.add(self.camera, pose=np.eye(4))
        flat, depth = self.renderer.render(scene, flags=pyrender.RenderFlags.FLAT | pyrender.RenderFlags.RGBA)
        mask = depth > 0
        labels = _decode_labels(flat[..., 0], mask)
        nx = flat[..., 1].astype(np.float32) / 127.5 - 1.0
        ny = flat[..., 2].astype(np.float32) / 127.5 - 1.0
        nz = np.sqrt(np.clip(1.0 - nx ** 2 - ny ** 2, 0.0, 1.0))  # visible surfaces face the camera (+z in GL)
        normals_cv = np.stack([nx, -ny, -nz], axis=-1)
        coverage = flat[..., 3].astype(np.float32) / 255.0
        return labels, normals_cv, coverage

    def close(self):
        self.renderer.delete()


def shade(labels: np.ndarray, normals: np.ndarray, part_colors: np.ndarray, light_dir: np.ndarray,
          ambient: float, diffuse: float) -> np.ndarray:
    """(S,S,3) float RGB in [0,1]: Lambert shading of the part colours (label 0 = background, left black)."""
    light = -np.asarray(light_dir, np.float64)
    light /= np.linalg.norm(light)
    lambert = np.clip(normals @ light.astype(np.float32), 0.0, 1.0)
    palette = np.concatenate([np.zeros((1, 3)), part_colors], axis=0).astype(np.float32)
    rgb = palette[labels] * (ambient + diffuse * lambert)[..., None]
    return np.clip(rgb, 0.0, 1.0)


def _decode_labels(red: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Label image from the flat pass. Pixels on part borders may be blended by multisampling: they take the
    label of the nearest exactly-coded pixel."""
    from scipy import ndimage

    red = red.astype(np.int32)
    exact = mask & (red % 10 == 0) & (red >= 10) & (red <= 240)
    labels = np.where(exact, red // 10, 0).astype(np.uint8)
    fix = mask & ~exact
    if fix.any() and exact.any():
        _, (iy, ix) = ndimage.distance_transform_edt(~exact, return_indices=True)
        labels[fix] = labels[iy[fix], ix[fix]]
    return labels


def spin_j24_from_h36m(h36m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B,17,3) H36M joints -> (B,24,3) SPIN J24 joints and (24,) bool 'filled' (face joints 19-23 are not)."""
    j24 = np.zeros(h36m.shape[:1] + (24, h36m.shape[2]))
    j24[:, :12] = h36m[:, H36M_TO_J14[:12]]
    j24[:, 12] = h36m[:, 8]   # neck (LSP) <- thorax
    j24[:, 13] = h36m[:, 10]  # top of head (LSP) <- head top
    j24[:, 14] = h36m[:, 0]   # pelvis
    j24[:, 15] = h36m[:, 8]   # thorax
    j24[:, 16] = h36m[:, 7]   # spine
    j24[:, 17] = h36m[:, 9]   # jaw <- neck/nose
    j24[:, 18] = h36m[:, 10]  # head (H36M)
    filled = np.zeros(24, bool)
    filled[:19] = True
    return j24, filled


def make_synthetic(out_dir, n: int = DEMO_N, seed: int = DEMO_SEED, split_name: str = "synthetic",
                   image_size: int = IMAGE_SIZE, smpl_dir=None, data_dir=None, progress: bool = False,
                   image_format: str = "jpg", limb_swing: float = LIMB_SWING,
                   joint_noise: float = JOINT_NOISE) -> Path:
    """Render ``n`` samples into ``out_dir`` (created; an existing set there is replaced). Returns out_dir.

    Deterministic in (n, seed, image_size, body model, limb_swing, joint_noise); the last two set the pose
    variation (:func:`random_pose`). ``split_name`` is recorded in dataset.json.
    """
    import cv2
    import torch

    from occbench.body import load_body_model, vertex_part_labels

    if n < 1:
        raise ValueError("n must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "parts"):
        if (out_dir / sub).exists():
            shutil.rmtree(out_dir / sub)
        (out_dir / sub).mkdir()
    if smpl_dir is None:
        # the stand-in even when the user has SMPL files: the synthetic sets must not depend on them
        from occbench.standin import standin_dir
        smpl_dir = standin_dir()
    body = load_body_model(smpl_dir=smpl_dir, data_dir=data_dir, gender="neutral")
    rng = np.random.default_rng(seed)
    focal = FOCAL * image_size / IMAGE_SIZE
    renderer = _Renderer(body.faces, vertex_part_labels(body), image_size, focal)
    cols = {k: [] for k in ("imgname", "partname", "center", "scale", "pose", "shape", "S", "part", "base_pose")}
    started = time.time()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"rendering {split_name}", unit="img")
    try:
        chunk = 32
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            poses, names = zip(*(random_pose(rng, limb_swing, joint_noise) for _ in range(m)))
            poses = np.stack(poses)
            betas = np.clip(rng.normal(0, 0.8, (m, 10)), -2.5, 2.5)
            with torch.no_grad():
                out = body.forward_axis_angle(torch.as_tensor(poses, dtype=torch.float32),
                                              torch.as_tensor(betas, dtype=torch.float32))
            verts = out.vertices.numpy().astype(np.float64)
            h36m = out.joints_h36m.numpy().astype(np.float64)
            for k in range(m):
                i = lo + k
                # place the person: distance so the body is 60-90% of the image tall, lateral offset
                height = float(np.ptp(verts[k][:, 1]))
                fill = rng.uniform(0.6, 0.9)
                depth = focal * height / (fill * image_size)
                offset = np.array([rng.uniform(-0.12, 0.12), rng.uniform(-0.08, 0.08)]) * depth * image_size / focal
                centre = (verts[k].max(0) + verts[k].min(0)) / 2
                trans = np.array([offset[0], offset[1], depth]) - centre
                v_cam = verts[k] + trans
                j_cam = h36m[k] + trans
                # light from above and in front (OpenCV frame: y down, camera looks along +z)
                light = np.array([rng.uniform(-0.7, 0.7), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0)])
                labels, normals, coverage = renderer.render(v_cam)
                rgb = shade(labels, normals, random_part_colors(rng), light, rng.uniform(0.3, 0.5),
                            rng.uniform(0.5, 0.8))
                background = random_background(rng, image_size).astype(np.float32)
                a = coverage[..., None]
                image = (rgb * 255.0 * a + background * (1 - a)).round().clip(0, 255).astype(np.uint8)
                # 2D joints and box
                j24_cam, filled = spin_j24_from_h36m(j_cam[None])
                j24_cam = j24_cam[0]
                z = np.where(filled, j24_cam[:, 2], 1.0)[:, None]
                uv = focal * j24_cam[:, :2] / z + image_size / 2
                part = np.concatenate([uv, filled[:, None].astype(np.float64)], axis=1)
                part[~filled, :2] = 0
                center, scale = bbox_from_keypoints(part[:19], factor=DEFAULT_BBOX_FACTOR)
                s = np.concatenate([j24_cam - j24_cam[14], filled[:, None].astype(np.float64)], axis=1)
                s[~filled, :3] = 0
                imgname = f"images/{i:06d}.{image_format}"
                partname = f"parts/{i:06d}.png"
                params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else []
                cv2.imwrite(str(out_dir / imgname), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
                cv2.imwrite(str(out_dir / partname), labels)
                for key, val in (("imgname", imgname), ("partname", partname), ("center", center),
                                 ("scale", scale), ("pose", poses[k]), ("shape", betas[k]), ("S", s),
                                 ("part", part), ("base_pose", names[k])):
                    cols[key].append(val)
                if bar is not None:
                    bar.update(1)
    finally:
        renderer.close()
        if bar is not None:
            bar.close()
    elapsed = time.time() - started
    arrays = {
        "imgname": np.array(cols["imgname"]), "partname": np.array(cols["partname"]),
        "center": np.array(cols["center"], np.float32), "scale": np.array(cols["scale"], np.float32),
        "pose": np.array(cols["pose"], np.float32), "shape": np.array(cols["shape"], np.float32),
        "gender": np.array(["n"] * n), "has_smpl": np.ones(n, np.float32),
        "S": np.array(cols["S"], np.float32), "part": np.array(cols["part"], np.float32),
        "base_pose": np.array(cols["base_pose"]),
    }
    np.savez(out_dir / "annotations.npz", **arrays)
    meta = {
        "name": split_name, "generator": "occbench.data.synthetic", "generator_version": GENERATOR_VERSION,
        "seed": int(seed), "n": int(n), "pose_variation": {"limb_swing": float(limb_swing),
                                                            "joint_noise": float(joint_noise)}, "image_size": int(image_size), "focal_px": focal,
        "bbox_factor": DEFAULT_BBOX_FACTOR, "annotations": "annotations.npz", "format": "spin-npz",
        "camera": "OpenCV frame; principal point at image centre", "part_labels": "parts/*.png: 0 background, "
        "1..24 = SMPL part + 1 (occbench.body.vertex_part_labels)",
        "note": "synthetic stand-in data" if body.is_standin else "synthetic data rendered with the user's SMPL",
        "body_model": {"standin": bool(body.is_standin), "sha256": body.provenance.get("sha256", {}),
                       "smpl_dir": None if body.is_standin else str(smpl_dir)},
    }
    (out_dir / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if progress:
        print(f"{n} samples in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.1f} samples/s) -> {out_dir}")
    return out_dir


def demo_dir() -> Path:
    from occbench.assets import cache_dir
    return cache_dir() / "demo"


def ensure_demo(smpl_dir=None, data_dir=None) -> Path:
    """The embedded demo set, generated on first use (a few seconds) into cache_dir()/demo.

    A cached set is regenerated when the generator, the seed, the size, the pose variation or the body model it
    was rendered with (file hashes) differ from now: its ground truth must come from the body the models are evaluated with."""
    from occbench.body import load_body_model

    folder = demo_dir()
    meta_path = folder / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            body = load_body_model(smpl_dir=smpl_dir, data_dir=data_dir, gender="neutral")
            if (meta.get("generator_version") == GENERATOR_VERSION and meta.get("seed") == DEMO_SEED
                    and meta.get("n") == DEMO_N and (folder / "annotations.npz").is_file()
                    and meta.get("pose_variation") == {"limb_swing": LIMB_SWING, "joint_noise": JOINT_NOISE}
                    and meta.get("body_model", {}).get("sha256") == body.provenance.get("sha256", {})):
                return folder
        except (OSError, json.JSONDecodeError):
            pass
    # write next to the final place, then move: a concurrent or interrupted run never leaves half a set
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="demo-", dir=folder.parent))
    try:
        make_synthetic(tmp, n=DEMO_N, seed=DEMO_SEED, split_name="demo", smpl_dir=smpl_dir, data_dir=data_dir)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "dataset.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder

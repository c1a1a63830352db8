"""A procedural stand-in for the SMPL body model, written in the exact SMPL file format.

The real SMPL files are licensed and cannot ship with occbench. Tests, the demo dataset and every model port
run on this stand-in instead: 6890 vertices, 13776 faces, SMPL's 24-joint kinematic tree, LBS weights,
J_regressor (24, 6890), shapedirs (6890, 3, 10), posedirs (6890, 3, 207), plus stand-in J_regressor_h36m.npy,
J_regressor_extra.npy and smpl_mean_params.npz. Numbers computed with it are NOT comparable to published ones.

How it is made (deterministic, ~10 s):
1. a rest skeleton in SMPL's T-pose proportions (y up, +x = the body's left, faces +z, ~1.75 m tall);
2. a surface: the smooth union (log-sum-exp) of limb capsules and torso/head/hand ellipsoids around it,
   meshed by marching cubes, decimated by quadric edge collapse to just under 13776 faces, then the longest
   edges are split (each split of an edge of a closed mesh adds 1 vertex and 2 faces) until F = 13776, which
   for a closed genus-0 surface forces V = F / 2 + 2 = 6890;
3. LBS weights: a soft assignment of each vertex to the primitives by radius-normalised distance (so a chest
   vertex belongs to the torso even where the upper arm's axis is closer), torso weight split along the spine;
4. joint regressors: for each joint, convex weights on its nearest vertices solved (NNLS) so the regressed
   joint lands on the skeleton joint;
5. shapedirs: 10 smooth directions (0 height, 1 girth, 2 leg length, 3 shoulder width, 4 belly, 5 hip width,
   6 arm length, 7 limb vs torso girth, 8 head size, 9 chest depth); posedirs: a small volume-keeping bulge
   around each bent joint.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STANDIN_VERSION = "occbench-standin-1"
NUM_VERTS = 6890
NUM_FACES = 13776
SMPL_PARENTS = np.array([-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21])
SMPL_JOINT_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle",
    "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hand", "right_hand")
# The 17 rows of J_regressor_h36m in the order SPIN / PARE index it: H36M_TO_J14 = [6,5,4,1,2,3,16,15,14,11,...]
# reads row 6 as the right ankle and row 1 as the left hip, so rows 1-3 are the body's LEFT leg (SMPL +x) and
# rows 4-6 the right leg, while rows 11-13 / 14-16 are the left / right arm.
H36M_JOINT_NAMES = (
    "pelvis", "left_hip", "left_knee", "left_ankle", "right_hip", "right_knee", "right_ankle", "spine",
    "thorax", "neck_nose", "head_top", "left_shoulder", "left_elbow", "left_wrist", "right_shoulder",
    "right_elbow", "right_wrist")
# SPIN's J_regressor_extra order.
EXTRA_JOINT_NAMES = ("right_hip", "left_hip", "neck_lsp", "head_top_lsp", "pelvis_mpii", "thorax_mpii",
                     "spine_h36m", "jaw_h36m", "head_h36m")
STANDIN_FILES = ("SMPL_NEUTRAL.npz", "SMPL_MALE.npz", "SMPL_FEMALE.npz", "J_regressor_h36m.npy",
                 "J_regressor_extra.npy", "smpl_mean_params.npz", "STANDIN.txt")

# Rest skeleton (metres), left side; the right side mirrors x. Close to SMPL neutral's rest joints.
_LEFT_JOINTS = {
    0: (0.0, -0.223, 0.028), 1: (0.068, -0.314, 0.018), 3: (0.0, -0.115, 0.003), 4: (0.104, -0.695, 0.026),
    6: (0.0, 0.020, 0.030), 7: (0.088, -1.090, -0.015), 9: (0.0, 0.075, 0.033), 10: (0.118, -1.145, 0.110),
    12: (0.0, 0.290, -0.015), 13: (0.075, 0.195, -0.005), 15: (0.0, 0.355, 0.035), 16: (0.185, 0.230, -0.015),
    18: (0.440, 0.215, -0.035), 20: (0.690, 0.222, -0.040), 22: (0.775, 0.215, -0.050),
}
_MIRROR = {1: 2, 4: 5, 7: 8, 10: 11, 13: 14, 16: 17, 18: 19, 20: 21, 22: 23}


def rest_joints() -> np.ndarray:
    """(24, 3) rest-pose joint positions of the stand-in skeleton."""
    joints = np.zeros((24, 3))
    for index, position in _LEFT_JOINTS.items():
        joints[index] = position
        if index in _MIRROR:
            joints[_MIRROR[index]] = (-position[0], position[1], position[2])
    return joints


@dataclass(frozen=True)
class _Primitive:
    """A capsule (a -> b, radius ra -> rb) or an ellipsoid (center a, radii b). ``part`` = SMPL joint, -1 = torso."""
    kind: str
    part: int
    a: tuple
    b: tuple
    ra: float = 0.0
    rb: float = 0.0


def _primitives() -> list[_Primitive]:
    J = rest_joints()
    prims = [
        _Primitive("ellipsoid", -1, (0.0, -0.235, 0.010), (0.160, 0.125, 0.112)),   # pelvis / hips
        _Primitive("ellipsoid", -1, (0.0, -0.050, 0.012), (0.140, 0.165, 0.102)),   # abdomen
        _Primitive("ellipsoid", -1, (0.0, 0.125, 0.002), (0.162, 0.150, 0.108)),    # chest
        _Primitive("capsule", -1, (-0.150, 0.222, -0.018), (0.150, 0.222, -0.018), 0.056, 0.056),  # shoulders
        _Primitive("capsule", 12, (0.0, 0.250, -0.012), (0.0, 0.385, 0.012), 0.054, 0.050),        # neck
        _Primitive("ellipsoid", 15, (0.0, 0.448, 0.025), (0.080, 0.110, 0.098)),    # head
    ]
    for side in (1.0, -1.0):
        def j(index):
            k = index if side > 0 else _MIRROR[index]
            return tuple(J[k]), k
        (hip, p_hip), (knee, p_knee), (ankle, p_ankle) = j(1), j(4), j(7)
        (sho, p_sho), (elb, p_elb), (wri, p_wri), (hand, p_hand) = j(16), j(18), j(20), j(22)
        p_foot = j(10)[1]
        x = side
        prims += [
            _Primitive("capsule", p_hip, hip, knee, 0.084, 0.056),
            _Primitive("capsule", p_knee, knee, ankle, 0.052, 0.037),
            _Primitive("capsule", p_ankle, (x * 0.090, -1.150, -0.030), (x * 0.108, -1.160, 0.075), 0.044, 0.041),
            _Primitive("capsule", p_foot, (x * 0.108, -1.163, 0.075), (x * 0.120, -1.170, 0.160), 0.038, 0.030),
            _Primitive("capsule", p_sho, sho, elb, 0.052, 0.041),
            _Primitive("capsule", p_elb, elb, wri, 0.039, 0.029),
            _Primitive("ellipsoid", p_wri, (x * 0.738, 0.219, -0.043), (0.058, 0.022, 0.043)),
            _Primitive("ellipsoid", p_hand, (x * 0.815, 0.214, -0.048), (0.052, 0.017, 0.037)),
        ]
        # collar: a short capsule inside the shoulder, carried by the collar joint
        prims.append(_Primitive("capsule", j(13)[1], j(13)[0], sho, 0.050, 0.052))
    return prims


def _primitive_fields(points: np.ndarray, prim: _Primitive):
    """Signed distance (approx., metres), radius-normalised distance (1 on its surface) and axis point."""
    a = np.asarray(prim.a)
    if prim.kind == "ellipsoid":
        radii = np.asarray(prim.b)
        rel = (points - a) / radii
        norm = np.linalg.norm(rel, axis=1)
        sdf = (norm - 1.0) * radii.min()
        # axis point: the center, except torso ellipsoids whose axis is the vertical spine line
        axis = np.broadcast_to(a, points.shape).copy()
        if prim.part == -1:
            axis[:, 1] = np.clip(points[:, 1], a[1] - radii[1], a[1] + radii[1])
        return sdf, norm, axis
    b = np.asarray(prim.b)
    seg = b - a
    t = np.clip(((points - a) @ seg) / (seg @ seg), 0.0, 1.0)
    axis = a + t[:, None] * seg
    dist = np.linalg.norm(points - axis, axis=1)
    radius = prim.ra + (prim.rb - prim.ra) * t
    return dist - radius, dist / radius, axis


_BLEND = 0.010  # smooth-union width (m)


def _body_sdf(points: np.ndarray, prims) -> np.ndarray:
    stack = np.stack([_primitive_fields(points, p)[0] for p in prims])
    low = stack.min(axis=0)
    return low - _BLEND * np.log(np.exp(-(stack - low) / _BLEND).sum(axis=0))


def _marching_cubes_surface(spacing: float = 0.009):
    from skimage import measure
    prims = _primitives()
    lo = np.array([-0.92, -1.24, -0.20])
    hi = np.array([0.92, 0.60, 0.24])
    counts = np.ceil((hi - lo) / spacing).astype(int) + 1
    axes = [lo[i] + spacing * np.arange(counts[i]) for i in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    sdf = np.concatenate([_body_sdf(chunk, prims) for chunk in np.array_split(grid, 16)]).reshape(*counts)
    verts, faces, _, _ = measure.marching_cubes(sdf.astype(np.float64), level=0.0, spacing=(spacing,) * 3,
                                                allow_degenerate=False)
    return verts + lo, faces.astype(np.int64)


def _split_longest_edges(verts: np.ndarray, faces: np.ndarray, num_splits: int):
    """Split the longest edge ``num_splits`` times; a closed, consistently oriented mesh stays so."""
    verts = [v for v in verts]
    faces = faces.copy()
    verts_arr = np.asarray(verts)
    for _ in range(num_splits):
        a_idx, b_idx = faces, np.roll(faces, -1, axis=1)
        lengths = np.linalg.norm(verts_arr[a_idx] - verts_arr[b_idx], axis=2)
        face_index, corner = np.unravel_index(np.argmax(lengths), lengths.shape)
        a, b = faces[face_index, corner], faces[face_index, (corner + 1) % 3]
        c = faces[face_index, (corner + 2) % 3]
        # the opposite face holds the directed edge b -> a
        hits = np.nonzero((b_idx == a) & (a_idx == b))
        other, other_corner = hits[0][0], hits[1][0]
        d = faces[other, (other_corner + 2) % 3]
        m = len(verts)
        verts.append(0.5 * (verts_arr[a] + verts_arr[b]))
        verts_arr = np.vstack([verts_arr, verts[-1][None]])
        faces[face_index] = (a, m, c)
        faces[other] = (b, m, d)
        faces = np.vstack([faces, [[m, b, c], [m, a, d]]])
    return verts_arr, faces


def _make_mesh():
    import fast_simplification
    import trimesh
    verts, faces = _marching_cubes_surface()
    mesh = trimesh.Trimesh(verts, faces, process=True)
    components = mesh.split(only_watertight=False)
    mesh = max(components, key=lambda m: len(m.faces))
    if mesh.volume < 0:
        mesh.invert()
    target = NUM_FACES - 200
    verts, faces = fast_simplification.simplify(np.asarray(mesh.vertices), np.asarray(mesh.faces),
                                                target_count=target)
    mesh = trimesh.Trimesh(verts, faces, process=True)
    if len(mesh.faces) > NUM_FACES or len(mesh.faces) % 2:
        raise RuntimeError(f"stand-in decimation gave {len(mesh.faces)} faces")
    verts, faces = _split_longest_edges(np.asarray(mesh.vertices), np.asarray(mesh.faces),
                                        (NUM_FACES - len(mesh.faces)) // 2)
    check = trimesh.Trimesh(verts, faces, process=False)
    if not (check.is_watertight and check.is_winding_consistent and check.euler_number == 2
            and len(verts) == NUM_VERTS and len(faces) == NUM_FACES):
        raise RuntimeError("stand-in mesh is not a closed genus-0 surface with SMPL's counts "
                           f"(V={len(verts)}, F={len(faces)}, euler={check.euler_number})")
    # Order vertices by height so the file is stable and neighbours are near in memory.
    order = np.lexsort((verts[:, 0], verts[:, 2], np.round(verts[:, 1], 4)))
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return verts[order], remap[faces]


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _skinning(verts: np.ndarray):
    """LBS weights (V, 24) and the radial offset of each vertex from its bone axis (V, 3)."""
    prims = _primitives()
    fields = [_primitive_fields(verts, p) for p in prims]
    norm = np.stack([f[1] for f in fields], axis=1)  # (V, P)
    axis = np.stack([f[2] for f in fields], axis=1)  # (V, P, 3)
    tau = 0.06
    logits = -(norm - norm.min(axis=1, keepdims=True)) / tau
    q = np.exp(logits)
    q[q < 1e-3] = 0.0
    q /= q.sum(axis=1, keepdims=True)
    radial = (q[:, :, None] * (verts[:, None, :] - axis)).sum(axis=1)
    weights = np.zeros((len(verts), 24))
    y = verts[:, 1]
    # torso weight split along the spine with smooth ramps; the upper outer chest goes to the collars
    up3 = _smoothstep((y + 0.200) / 0.06)
    up6 = _smoothstep((y + 0.050) / 0.06)
    up9 = _smoothstep((y - 0.070) / 0.06)
    collar = _smoothstep((np.abs(verts[:, 0]) - 0.10) / 0.06) * _smoothstep((y - 0.15) / 0.05)
    torso_split = np.stack([1 - up3, up3 * (1 - up6), up6 * (1 - up9), up9 * (1 - collar), up9 * collar], 1)
    for p, prim in enumerate(prims):
        if prim.part >= 0:
            weights[:, prim.part] += q[:, p]
            continue
        weights[:, 0] += q[:, p] * torso_split[:, 0]
        weights[:, 3] += q[:, p] * torso_split[:, 1]
        weights[:, 6] += q[:, p] * torso_split[:, 2]
        weights[:, 9] += q[:, p] * torso_split[:, 3]
        left = verts[:, 0] > 0
        weights[:, 13] += q[:, p] * torso_split[:, 4] * left
        weights[:, 14] += q[:, p] * torso_split[:, 4] * ~left
    weights[weights < 1e-3] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    return weights, radial


def _convex_regressor(verts: np.ndarray, targets: np.ndarray, num_neighbours: int = 96) -> np.ndarray:
    """(J, V) rows of non-negative weights summing to 1, each on the vertices nearest its target point,
    solved so that ``regressor @ verts`` lands as close as possible to ``targets`` (J, 3)."""
    from scipy.optimize import nnls
    regressor = np.zeros((len(targets), len(verts)))
    for row, target in enumerate(targets):
        dist = np.linalg.norm(verts - target, axis=1)
        order = np.argsort(dist, kind="stable")
        count = num_neighbours
        while True:
            # the nearest vertices may all lie on one side (a joint inside a thick torso): widen until the
            # target is inside their hull and the fit is within 2 mm
            near = order[:count]
            prior = np.exp(-0.5 * (dist[near] / max(dist[near].max() * 0.5, 1e-3)) ** 2)
            prior /= prior.sum()
            fit, unit, reg = 300.0, 300.0, 1.0
            A = np.vstack([fit * verts[near].T, unit * np.ones((1, len(near))), reg * np.eye(len(near))])
            b = np.concatenate([fit * target, [unit], reg * prior])
            w, _ = nnls(A, b, maxiter=50 * len(near))
            w = w / w.sum()
            if np.linalg.norm(w @ verts[near] - target) < 0.002 or count >= 8 * num_neighbours:
                break
            count *= 2
        regressor[row, near] = w
    return regressor


_JAW = (0.0, 0.385, 0.085)  # H36M "neck/nose", the same point as SPIN's extra "jaw (H36M)"


def _h36m_targets() -> np.ndarray:
    left = {
        "hip": (0.090, -0.300, 0.020), "knee": (0.105, -0.700, 0.030), "ankle": (0.088, -1.100, -0.015),
        "shoulder": (0.190, 0.225, -0.012), "elbow": (0.440, 0.215, -0.035), "wrist": (0.690, 0.222, -0.040),
    }

    def right(name):
        x, y, z = left[name]
        return (-x, y, z)
    return np.array([
        (0.0, -0.270, 0.020), left["hip"], left["knee"], left["ankle"], right("hip"), right("knee"),
        right("ankle"), (0.0, -0.020, 0.012), (0.0, 0.240, -0.005), _JAW, (0.0, 0.530, 0.022),
        left["shoulder"], left["elbow"], left["wrist"], right("shoulder"), right("elbow"), right("wrist"),
    ])


def _extra_targets() -> np.ndarray:
    return np.array([
        (-0.090, -0.300, 0.020), (0.090, -0.300, 0.020), (0.0, 0.270, -0.008), (0.0, 0.535, 0.022),
        (0.0, -0.270, 0.020), (0.0, 0.250, -0.005), (0.0, -0.020, 0.012), _JAW,
        (0.0, 0.450, 0.030),
    ])


def _shapedirs(verts: np.ndarray, weights: np.ndarray, radial: np.ndarray) -> np.ndarray:
    x, y, z = verts[:, 0], verts[:, 1], verts[:, 2]
    torso = weights[:, [0, 3, 6, 9, 13, 14]].sum(axis=1)
    arms = weights[:, 16:24].sum(axis=1)
    legs = weights[:, [1, 2, 4, 5, 7, 8, 10, 11]].sum(axis=1)
    head = weights[:, 15]
    side = np.sign(x)
    dirs = np.zeros((len(verts), 3, 10))
    dirs[:, :, 0] = verts * np.array([0.022, 0.05, 0.022])                         # overall height / size
    dirs[:, :, 1] = radial * (0.10 + 0.08 * torso)[:, None]                        # girth
    dirs[:, 1, 2] = np.minimum(y + 0.30, 0.0) * 0.05                               # leg length
    upper = _smoothstep((y - 0.05) / 0.15)
    dirs[:, 0, 3] = side * 0.018 * _smoothstep(np.abs(x) / 0.2) * upper            # shoulder width
    belly = np.exp(-0.5 * ((y + 0.06) / 0.09) ** 2) * _smoothstep(z / 0.08) * torso
    dirs[:, 2, 4] = 0.025 * belly                                                  # belly
    hips = np.exp(-0.5 * ((y + 0.30) / 0.12) ** 2) * (torso + legs)
    dirs[:, 0, 5] = x * 0.10 * hips                                                # hip width
    dirs[:, 0, 6] = side * 0.05 * np.clip((np.abs(x) - 0.2) / 0.6, 0, 1) * arms    # arm length
    dirs[:, :, 7] = radial * (0.08 * (arms + legs) - 0.04 * torso)[:, None]        # limb vs torso girth
    head_center = np.array([0.0, 0.448, 0.025])
    dirs[:, :, 8] = (verts - head_center) * 0.06 * head[:, None]                   # head size
    chest = np.exp(-0.5 * ((y - 0.12) / 0.10) ** 2) * torso
    dirs[:, 2, 9] = (z - 0.0) * 0.12 * chest                                       # chest depth
    return dirs


def _posedirs(verts: np.ndarray, weights: np.ndarray, radial: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """A bulge that keeps volume at bent joints: displacement = -k g(v) radial(v) * trace(R_k - I)."""
    posedirs = np.zeros((len(verts), 3, 207))
    radii = np.full(24, 0.06)
    radii[[15, 12]] = 0.07
    radii[[20, 21, 22, 23, 10, 11]] = 0.03
    for k in range(1, 24):
        near = weights[:, k] + weights[:, SMPL_PARENTS[k]]
        g = np.exp(-0.5 * (np.linalg.norm(verts - joints[k], axis=1) / radii[k]) ** 2) * near
        for diag in (0, 4, 8):
            posedirs[:, :, 9 * (k - 1) + diag] = -0.05 * g[:, None] * radial
    return posedirs


def _mean_params() -> dict:
    from scipy.spatial.transform import Rotation
    pose = np.tile(np.eye(3), (24, 1, 1))
    pose[0] = Rotation.from_rotvec([np.pi, 0, 0]).as_matrix()  # upright in camera coords (y down), as SPIN
    pose[16] = Rotation.from_rotvec([0, 0, -1.05]).as_matrix()  # arms relaxed down
    pose[17] = Rotation.from_rotvec([0, 0, 1.05]).as_matrix()
    pose[18] = Rotation.from_rotvec([0, -0.25, 0]).as_matrix()
    pose[19] = Rotation.from_rotvec([0, 0.25, 0]).as_matrix()
    pose[4] = Rotation.from_rotvec([0.12, 0, 0]).as_matrix()
    pose[5] = Rotation.from_rotvec([0.12, 0, 0]).as_matrix()
    rot6d = pose[:, :, :2].reshape(24 * 6)
    return {"pose": rot6d.astype(np.float32), "shape": np.zeros(10, np.float32),
            "cam": np.array([0.9, 0.0, 0.0], np.float32)}


GENDER_BETAS = {
    "NEUTRAL": np.zeros(10),
    "MALE": np.array([0.8, 0.2, 0.0, 1.0, 0.2, -0.8, 0.2, 0.2, 0.0, 0.3]),
    "FEMALE": np.array([-0.8, -0.2, 0.0, -0.8, -0.2, 1.2, -0.2, -0.3, -0.2, -0.2]),
}


def build_standin() -> dict:
    """All stand-in arrays: {'SMPL_NEUTRAL': dict, 'SMPL_MALE': ..., 'SMPL_FEMALE': ..., 'J_regressor_h36m',
    'J_regressor_extra', 'smpl_mean_params': dict}."""
    verts, faces = _make_mesh()
    weights, radial = _skinning(verts)
    joints = rest_joints()
    shapedirs = _shapedirs(verts, weights, radial)
    posedirs = _posedirs(verts, weights, radial, joints)
    regressor = _convex_regressor(verts, joints)
    kintree = np.stack([np.where(SMPL_PARENTS < 0, 4294967295, SMPL_PARENTS), np.arange(24)]).astype(np.int64)
    out = {}
    for gender, betas in GENDER_BETAS.items():
        out[f"SMPL_{gender}"] = {
            "v_template": verts + shapedirs @ betas, "f": faces.astype(np.int64), "weights": weights,
            "kintree_table": kintree, "J_regressor": regressor, "shapedirs": shapedirs, "posedirs": posedirs,
            "J": regressor @ (verts + shapedirs @ betas),
        }
    out["J_regressor_h36m"] = _convex_regressor(verts, _h36m_targets())
    out["J_regressor_extra"] = _convex_regressor(verts, _extra_targets())
    out["smpl_mean_params"] = _mean_params()
    return out


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


STANDIN_NOTE = f"""{STANDIN_VERSION}
This folder holds occbench's procedural STAND-IN body, not SMPL.
It has SMPL's file format (6890 vertices, 13776 faces, 24 joints, kinematic tree, LBS weights, J_regressor,
shapedirs (10 betas), posedirs (207)) so that smplx and every model port run on it, but its surface, weights
and regressors are made up by occbench (occbench/standin.py). J_regressor_h36m.npy, J_regressor_extra.npy and
smpl_mean_params.npz here are stand-ins too. Numbers computed with it are NOT comparable to published results.
Get the real model from https://smpl.is.tue.mpg.de and point occbench at it (--smpl-dir / OCCBENCH_SMPL_DIR).
"""


def write_standin(out_dir: str | os.PathLike) -> Path:
    """Write the stand-in files (``STANDIN_FILES``) into ``out_dir``; same bytes every time for a version."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_standin()
    blobs = {f"{name}.npz": _npz_bytes(data[name]) for name in ("SMPL_NEUTRAL", "SMPL_MALE", "SMPL_FEMALE")}
    blobs["J_regressor_h36m.npy"] = _npy_bytes(data["J_regressor_h36m"])
    blobs["J_regressor_extra.npy"] = _npy_bytes(data["J_regressor_extra"])
    blobs["smpl_mean_params.npz"] = _npz_bytes(data["smpl_mean_params"])
    blobs["STANDIN.txt"] = STANDIN_NOTE.encode()
    for name, blob in blobs.items():
        (out / name).write_bytes(blob)
    return out


def standin_dir() -> Path:
    """The cached stand-in folder (occbench.assets.cache_dir()/standin), generated on first use."""
    from occbench.assets import cache_dir
    folder = cache_dir() / "standin"
    if _is_complete(folder):
        return folder
    # Build in a private temp folder and rename into place, so concurrent first uses never see half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=".standin-", dir=folder.parent))
    try:
        write_standin(tmp)
        if _is_complete(folder):
            return folder
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_complete(folder):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _is_complete(folder: Path) -> bool:
    note = folder / "STANDIN.txt"
    if not all((folder / name).is_file() for name in STANDIN_FILES):
        return False
    return note.read_text().splitlines()[:1] == [STANDIN_VERSION]


def is_standin_dir(folder: str | os.PathLike) -> bool:
    note = Path(folder) / "STANDIN.txt"
    return note.is_file() and note.read_text().startswith("occbench-standin")

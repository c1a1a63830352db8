"""Metrics against known answers and an independent per-sample numpy reference."""
import math

import numpy as np
import pytest
import torch

from occbench import metrics as M


def _rotation(axis, angle):
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _skeleton(batch, joints=14, seed=0):
    """Random, clearly non-planar joint sets, roughly body-sized (metres)."""
    rng = np.random.default_rng(seed)
    return rng.normal(scale=0.3, size=(batch, joints, 3))


def _numpy_procrustes(pred, gt):
    """Unbatched textbook similarity Procrustes (Umeyama), pred/gt (N,3) -> aligned pred (N,3)."""
    mu_p, mu_g = pred.mean(0), gt.mean(0)
    p, g = pred - mu_p, gt - mu_g
    cov = g.T @ p / len(p)                     # Umeyama's Sigma_xy with x = gt, y = pred
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        s[2, 2] = -1
    rot = u @ s @ vt                           # maps pred -> gt
    scale = np.trace(np.diag(d) @ s) / (p ** 2).sum(1).mean()
    return scale * p @ rot.T + mu_g


def _numpy_pa_mpjpe(pred, gt, mask=None):
    out = np.full(pred.shape[:2], np.nan)
    for b in range(pred.shape[0]):
        vis = np.ones(pred.shape[1], bool) if mask is None else mask[b]
        p, g = pred[b][vis], gt[b][vis]
        out[b, vis] = np.linalg.norm(_numpy_procrustes(p, g) - g, axis=1) * 1000
    return out


def test_similarity_copy_has_zero_pa_mpjpe_and_expected_mpjpe():
    gt = torch.tensor(_skeleton(4))
    pelvis = torch.zeros(4, 3, dtype=torch.float64)
    # Pure rotation by angle a about z: each joint moves by 2 sin(a/2) * its distance from the z axis.
    angle = 0.3
    rot = torch.tensor(_rotation([0, 0, 1], angle))
    pred = gt @ rot.T
    expected = 2 * math.sin(angle / 2) * torch.linalg.vector_norm(gt[..., :2], dim=-1) * 1000
    got = M.mpjpe(M.align_pelvis(pred, "h36m-root", pelvis), M.align_pelvis(gt, "h36m-root", pelvis))
    torch.testing.assert_close(got, expected)
    # Pure scaling about the pelvis: each joint moves by |s - 1| * its distance from the pelvis.
    scaled = 1.3 * gt
    torch.testing.assert_close(M.mpjpe(scaled, gt), 0.3 * torch.linalg.vector_norm(gt, dim=-1) * 1000)
    # Rotation + scale + translation: PA-MPJPE is zero.
    rot2 = torch.tensor(_rotation([1, 2, -0.5], 2.0))
    similar = 0.7 * gt @ rot2.T + torch.tensor([0.1, -2.0, 5.0], dtype=torch.float64)
    pa = M.pa_mpjpe(similar, gt)
    assert pa.shape == (4, 14)
    assert pa.abs().max() < 1e-6
    scale, r, t = M.similarity_transform(similar, gt)
    torch.testing.assert_close(scale, torch.full((4,), 1 / 0.7, dtype=torch.float64))
    torch.testing.assert_close(r, rot2.T.expand(4, 3, 3))


def test_float32_similarity_copy_is_aligned():
    gt = torch.tensor(_skeleton(2), dtype=torch.float32)
    rot = torch.tensor(_rotation([0.3, 1, 0.2], 1.1), dtype=torch.float32)
    pred = 1.2 * gt @ rot.T + 0.5
    pa = M.pa_mpjpe(pred, gt)
    assert pa.dtype == torch.float32
    assert pa.max() < 1e-2  # < 0.01 mm in float32


def test_reflected_copy_is_not_aligned_to_zero():
    gt = torch.tensor(_skeleton(3, seed=1))
    mirrored = gt * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    pa = M.pa_mpjpe(mirrored, gt)
    assert pa.mean() > 10.0  # tens of mm for a 0.3 m spread; a reflection fit would give 0
    _, rot, _ = M.similarity_transform(mirrored, gt)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(3, dtype=torch.float64))
    # agrees with the textbook per-sample reference, which also forbids reflections
    np.testing.assert_allclose(pa.numpy(), _numpy_pa_mpjpe(mirrored.numpy(), gt.numpy()), atol=1e-8)


@pytest.mark.parametrize("batch", [1, 2, 3, 64])
def test_batched_pa_mpjpe_matches_per_sample_reference(batch):
    gt = _skeleton(batch, seed=batch)
    pred = gt + np.random.default_rng(100 + batch).normal(scale=0.05, size=gt.shape)
    mask = np.random.default_rng(7).random((batch, 14)) > 0.3
    mask[:, :4] = True  # at least 4 visible joints per sample
    expected = _numpy_pa_mpjpe(pred, gt, mask)
    got = M.pa_mpjpe(torch.tensor(pred), torch.tensor(gt), torch.tensor(mask))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-7)
    # float32 input gives the same numbers to float32 precision
    got32 = M.pa_mpjpe(torch.tensor(pred, dtype=torch.float32), torch.tensor(gt, dtype=torch.float32),
                       torch.tensor(mask))
    np.testing.assert_allclose(got32.numpy(), expected, atol=1e-2)
    # unmasked too
    np.testing.assert_allclose(M.pa_mpjpe(torch.tensor(pred), torch.tensor(gt)).numpy(),
                               _numpy_pa_mpjpe(pred, gt), atol=1e-7)


def test_masked_joints_do_not_change_results():
    gt = torch.tensor(_skeleton(3, seed=3))
    pred = gt + torch.tensor(np.random.default_rng(4).normal(scale=0.04, size=gt.shape))
    mask = torch.ones(3, 14, dtype=torch.bool)
    mask[0, [1, 5, 13]] = False
    mask[2, 7] = False
    garbage_pred, garbage_gt = pred.clone(), gt.clone()
    garbage_pred[~mask] = torch.tensor([float("nan"), 1e6, -3.0], dtype=torch.float64)
    garbage_gt[~mask] = torch.tensor([float("inf"), 42.0, 0.0], dtype=torch.float64)
    for fn in (M.mpjpe, M.pa_mpjpe, M.axis_mje):
        clean, dirty = fn(pred, gt, mask), fn(garbage_pred, garbage_gt, mask)
        torch.testing.assert_close(clean, dirty, equal_nan=True)
        assert torch.isnan(dirty[~mask]).all()
        assert torch.isfinite(dirty[mask]).all()
    # PA fitted on the visible joints equals PA computed on the visible subset alone
    vis0 = mask[0]
    sub = M.pa_mpjpe(pred[:1, vis0], gt[:1, vis0])
    torch.testing.assert_close(M.pa_mpjpe(garbage_pred, garbage_gt, mask)[0, vis0], sub[0])
    for reduction in M.REDUCTIONS:
        torch.testing.assert_close(M.reduce(M.mpjpe(pred, gt, mask), mask, reduction),
                                   M.reduce(M.mpjpe(garbage_pred, garbage_gt, mask), mask, reduction))


def test_pa_mpjpe_with_too_few_visible_joints_is_nan():
    gt = torch.tensor(_skeleton(2))
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, 2:] = False  # only 2 visible joints in sample 1
    pa = M.pa_mpjpe(gt + 0.01, gt, mask)
    assert torch.isnan(pa[1]).all()
    assert torch.isfinite(pa[0]).all()


def test_align_pelvis_conventions():
    joints = torch.tensor(_skeleton(2))
    mid = M.align_pelvis(joints, "mid-hip")
    torch.testing.assert_close(mid[:, 2] + mid[:, 3], torch.zeros(2, 3, dtype=torch.float64))
    pelvis = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]], dtype=torch.float64)
    root = M.align_pelvis(joints, "h36m-root", pelvis=pelvis)
    torch.testing.assert_close(root, joints - pelvis[:, None])
    with pytest.raises(ValueError, match="pelvis="):
        M.align_pelvis(joints, "h36m-root")
    with pytest.raises(ValueError, match="unknown pelvis convention"):
        M.align_pelvis(joints, "hip")
    with pytest.raises(ValueError, match="LSP-14"):
        M.align_pelvis(joints[:, :10], "mid-hip")


def test_axis_mje_and_pve():
    gt = torch.zeros(1, 2, 3)
    pred = torch.tensor([[[0.001, -0.002, 0.003], [0.0, 0.0, -0.010]]])
    torch.testing.assert_close(M.axis_mje(pred, gt), torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 10.0]]]))
    torch.testing.assert_close(M.reduce(M.axis_mje(pred, gt)), torch.tensor([0.5, 1.0, 6.5]))
    verts = torch.zeros(2, 6890, 3)
    shifted = verts + torch.tensor([0.003, 0.004, 0.0])
    err = M.pve(shifted, verts)
    assert err.shape == (2, 6890)
    torch.testing.assert_close(err, torch.full((2, 6890), 5.0))  # no alignment removes the shift


def test_pve_s_and_pve_p_use_the_decomposed_meshes():
    class LinearBody:
        """Toy body: vertex = betas[0] * v0 + sum of rotation entries; enough to check which inputs are used."""

        def __call__(self, rotmat, betas):
            from types import SimpleNamespace
            offset = rotmat.flatten(1).sum(dim=1)[:, None, None]
            return SimpleNamespace(vertices=betas[:, :1, None] * torch.ones(1, 5, 3) + offset)

    body = LinearBody()
    rot = torch.eye(3).repeat(1, 24, 1, 1)
    rot[:, 1] = torch.tensor(_rotation([1, 0, 0], 1.0), dtype=torch.float32)
    betas = torch.zeros(1, 10)
    betas[0, 0] = 2.0
    rest, zero_shape = M.decomposed_vertices(body, rot, betas)
    torch.testing.assert_close(rest, torch.full((1, 5, 3), 2.0 + 72.0))
    torch.testing.assert_close(zero_shape, torch.full((1, 5, 3), float(rot.sum())))
    torch.testing.assert_close(M.pve_s(rest, rest + 0.001), torch.full((1, 5), math.sqrt(3.0)), atol=2e-3, rtol=0)
    torch.testing.assert_close(M.pve_p(zero_shape, zero_shape), torch.zeros(1, 5))


def test_pckh_hand_made():
    gt = torch.zeros(2, 14, 2)
    gt[:, 12] = torch.tensor([100.0, 100.0])
    gt[:, 13] = torch.tensor([100.0, 80.0])        # head size 20 px -> threshold 10 px
    head = M.head_size_lsp14(gt)
    torch.testing.assert_close(head, torch.tensor([20.0, 20.0]))
    pred = gt.clone()
    pred[0, 0] += torch.tensor([9.9, 0.0])         # correct
    pred[0, 1] += torch.tensor([6.0, 8.0])         # exactly 10 px: not < 10 -> wrong
    pred[1, 0] += torch.tensor([0.0, 30.0])        # wrong
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, 1] = False                             # not visible in sample 1
    correct = M.pckh(pred, gt, head, mask)
    assert correct.dtype == torch.bool
    assert correct[0, 0] and not correct[0, 1] and not correct[1, 0] and not correct[1, 1]
    assert correct[:, 2:].all()
    mean, per_joint = M.pckh_accuracy(correct, mask)
    expected = torch.ones(14, dtype=torch.float64)
    expected[0], expected[1] = 0.5, 0.0            # joint 1: 0 correct of its 1 visible instance
    torch.testing.assert_close(per_joint, expected)
    torch.testing.assert_close(mean, expected.mean())
    # threshold is a parameter
    assert M.pckh(pred, gt, head, mask, threshold=1.0)[0, 1]


def test_pckh_accuracy_is_per_joint_not_pooled():
    # joint 0 visible in 3 images (all correct), joint 1 visible in 1 image (wrong):
    # per-joint mean = (1 + 0) / 2 = 0.5; 3DNBF's pooled count would give 3 / 4 = 0.75.
    correct = torch.tensor([[True, False], [True, False], [True, False]])
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    mean, per_joint = M.pckh_accuracy(correct, mask)
    torch.testing.assert_close(per_joint, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert float(mean) == 0.5
    # a joint never visible is NaN and left out of the mean
    mean, per_joint = M.pckh_accuracy(correct, torch.tensor([[True, False]] * 3))
    assert float(mean) == 1.0 and torch.isnan(per_joint[1])


def test_pckh_without_head_size_leaves_the_sample_out():
    gt = torch.rand(2, 14, 2) * 100
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, 13] = False                            # no head top -> no head size for sample 1
    head = M.head_size_lsp14(gt, mask)
    assert torch.isfinite(head[0]) and torch.isnan(head[1])
    correct = M.pckh(gt, gt, head, mask)           # perfect predictions
    assert correct[0].all() and not correct[1].any()
    mean, per_joint = M.pckh_accuracy(correct, mask, head_size=head)
    assert float(mean) == 1.0                      # sample 1 is not counted as wrong
    mean_wrong, _ = M.pckh_accuracy(correct, mask)
    assert float(mean_wrong) < 1.0                 # without head_size it would be


def test_reduce_per_sample_vs_pooled_visible():
    errors = torch.tensor([[10.0, 20.0, 30.0, 40.0],
                           [100.0, 999.0, 999.0, 999.0],
                           [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, True, True],
                         [True, False, False, False],
                         [False, False, False, False]])   # sample 2 has nothing visible
    # per-sample: mean(25, 100) = 62.5 (sample 2 left out); pooled: (10+20+30+40+100) / 5 = 40
    assert float(M.reduce(errors, mask, "per-sample")) == 62.5
    assert float(M.reduce(errors, mask, "pooled-visible")) == 40.0
    nan_errors = M.mpjpe(torch.zeros(3, 4, 3), torch.zeros(3, 4, 3), mask)
    assert torch.isnan(nan_errors[~mask]).all()
    assert float(M.reduce(nan_errors, mask, "pooled-visible")) == 0.0
    # a NaN at a visible joint is not hidden
    errors[0, 0] = float("nan")
    assert torch.isnan(M.reduce(errors, mask, "per-sample"))
    with pytest.raises(ValueError, match="unknown reduction"):
        M.reduce(errors, mask, "mean")


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        M.mpjpe(torch.zeros(2, 14, 3), torch.zeros(2, 17, 3))
    with pytest.raises(ValueError, match="mask"):
        M.mpjpe(torch.zeros(2, 14, 3), torch.zeros(2, 14, 3), torch.ones(2, 13, dtype=torch.bool))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_metric_keeps_device_and_dtype(device, dtype):
    gt64 = torch.tensor(_skeleton(5))
    pred64 = gt64 + 0.02 * torch.tensor(np.random.default_rng(9).normal(size=gt64.shape))
    mask = torch.ones(5, 14, dtype=torch.bool)
    mask[0, 3] = False
    reference = M.pa_mpjpe(pred64, gt64, mask)
    gt, pred, mask_d = gt64.to(device, dtype), pred64.to(device, dtype), mask.to(device)
    outputs = [M.mpjpe(pred, gt, mask_d), M.pa_mpjpe(pred, gt, mask_d), M.axis_mje(pred, gt, mask_d),
               M.pve(pred, gt), M.align_pelvis(pred, "mid-hip"),
               M.head_size_lsp14(gt[..., :2], mask_d)]
    for out in outputs:
        assert out.device.type == device and out.dtype == dtype
    torch.testing.assert_close(outputs[1].cpu().double(), reference, equal_nan=True, atol=1e-3, rtol=1e-4)
    assert M.pckh(pred[..., :2], gt[..., :2], outputs[-1], mask_d).device.type == device
    assert M.reduce(outputs[0], mask_d, "pooled-visible").dtype == dtype

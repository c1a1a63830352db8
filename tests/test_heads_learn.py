"""Evidence that the BoPR and HKMR heads are wired right (no weights exist to compare against).

Each model is trained from random initialisation on a handful of fixed synthetic samples and its training
error must fall by a large factor (5x) within a CPU budget of ~15 s per model:
- the backbone is frozen and run once on a small 32 px input to cache the features (8x8 maps for BoPR,
  a 2048 vector for HKMR); its BatchNorm layers
  use batch statistics there (random-init running statistics would blow the features up to ~25 mean);
  everything after the backbone (the heads under test) is trained;
- BoPR is built with dropout=0 (memorisation; dropout only slows it down);
- HKMR is supervised on its final outer iteration only: with the paper's sum over the 3 outer iterations
  the shared chain networks must learn a fixed point (residual 0 at the target), which takes far more
  steps than a unit test has (the summed loss plateaus near 4x after 100 steps); all iterations still run
  and are back-propagated through;
- torch runs single-threaded here (the test machine is shared; more threads only add contention);
- images and targets are the first samples of the synthetic demo set (occbench.data "demo"): SMPL pose and
  betas, SMPL-24 joints through the body model, 2D targets from a weak-perspective camera fitted to the
  GT 2D joints, relative torso-plane depths and segmentation maps computed from the GT mesh.
The error asserted is the paper's training objective (3D joints through the body model + 2D + SMPL
parameters + model-specific terms) and the 3D joint error (MPJPE, mm) on its own.
"""
import time

import numpy as np
import pytest
import torch

from occbench.camera import fit_weak_camera
from occbench.models import bopr, hkmr
from occbench.models.base import IMAGENET_MEAN, IMAGENET_STD
from occbench.rotations import axis_angle_to_rotmat

NUM_SAMPLES = 4
INPUT_SIZE = 32
STEPS = {"bopr": 120, "hkmr": 60}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def body():
    from occbench.body import load_body_model
    return load_body_model()


@pytest.fixture(scope="module")
def mean():
    from occbench.body import load_mean_params
    return load_mean_params()


def _demo_batch(body):
    """The first NUM_SAMPLES samples of the synthetic demo set: normalized images (B,3,S,S) and targets:
    rotmat, betas, joints3d (pelvis-relative SMPL-24 [m]), joints2d / vertices2d (crop px, from a weak
    camera fitted to the GT LSP-14 2D joints), rel_depth (torso-plane depths of the part centres)."""
    from occbench.body import vertex_part_labels
    from occbench.data import open_dataset

    dataset = open_dataset("demo")
    samples = [dataset[i] for i in range(NUM_SAMPLES)]
    crops = torch.stack([torch.as_tensor(s.crop).permute(2, 0, 1).float() / 255 for s in samples])
    crops = torch.nn.functional.interpolate(crops, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                                            align_corners=False, antialias=True)
    images = (crops - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    pose = torch.as_tensor(np.stack([s.pose for s in samples])).float()
    rotmat = axis_angle_to_rotmat(pose.view(-1, 3)).view(-1, 24, 3, 3)
    betas = torch.as_tensor(np.stack([s.betas for s in samples])).float()
    with torch.no_grad():
        out = body(rotmat=rotmat, betas=betas)
    joints2d, vertices2d = [], []
    for i, s in enumerate(samples):
        a, b = fit_weak_camera(out.joints_lsp[i].numpy(), s.joints2d, np.asarray(s.joints2d_valid, bool))
        b = torch.as_tensor(b, dtype=torch.float32)
        joints2d.append(a * out.joints_smpl[i, :, :2] + b)
        vertices2d.append(a * out.vertices[i, :, :2] + b)
    labels = torch.as_tensor(vertex_part_labels(body))
    target = {"rotmat": rotmat, "betas": betas, "joints3d": out.joints_smpl - out.joints_smpl[:, :1],
              "joints2d": torch.stack(joints2d), "vertices2d": torch.stack(vertices2d), "part_labels": labels,
              "rel_depth": bopr.relative_torso_depths(bopr.part_centres(out.vertices, labels), out.joints_smpl)}
    return images, target


@torch.no_grad()
def _frozen_features(backbone, images):
    backbone.train()                      # batch statistics, see the module docstring
    features = backbone(images)
    backbone.eval()
    return features


def _mpjpe_mm(body, rotmat, betas, target):
    out = body(rotmat=rotmat, betas=betas)
    joints = out.joints_smpl - out.joints_smpl[:, :1]
    return 1000 * (joints - target["joints3d"]).norm(dim=-1).mean().item()


def _train(step_fn, params, steps, lr):
    optimizer = torch.optim.Adam(params, lr=lr)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, mpjpe = step_fn()
        loss.backward()
        optimizer.step()
        history.append((loss.item(), mpjpe))
    return history


def test_bopr_head_learns_a_handful_of_samples(body, mean):
    torch.manual_seed(0)
    start = time.perf_counter()
    model = bopr.BoPR(mean, backbone="hrnet_w32", dropout=0.0)
    images, target = _demo_batch(body)
    features = _frozen_features(model.backbone, images)
    size = features.shape[-1]
    target["body_mask"], target["part_map"] = bopr.segmentation_targets(
        target["vertices2d"], target["part_labels"], size)
    head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    model.train()

    def step():
        rotmat, betas, cam, extras = model.regress_from_features(features)
        terms = bopr.compute_losses(rotmat, betas, cam, extras, target, body)
        return terms["total"], _mpjpe_mm(body, rotmat.detach(), betas.detach(), target)

    history = _train(step, head_params, steps=STEPS["bopr"], lr=1e-3)
    elapsed = time.perf_counter() - start
    (loss0, mpjpe0), (loss1, mpjpe1) = history[0], history[-1]
    print(f"BoPR head: loss {loss0:.4f} -> {loss1:.4f} ({loss0 / loss1:.1f}x), "
          f"MPJPE {mpjpe0:.1f} -> {mpjpe1:.1f} mm ({mpjpe0 / mpjpe1:.1f}x) in {elapsed:.1f} s "
          f"({size}x{size} features)")
    assert loss1 < loss0 / 5
    assert mpjpe1 < mpjpe0 / 5


def test_hkmr_head_learns_a_handful_of_samples(body, mean):
    torch.manual_seed(0)
    start = time.perf_counter()
    model = hkmr.HKMR(mean)
    images, target = _demo_batch(body)
    features = _frozen_features(model.encoder, images).mean(dim=(2, 3))
    head_params = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    model.train()

    def step():
        rotmat, betas, cam, extras = model.regress_from_features(features)
        terms = hkmr.compute_losses(extras, target, body, iteration_weights=(0, 0, 1))
        return terms["total"], _mpjpe_mm(body, rotmat.detach(), betas.detach(), target)

    history = _train(step, head_params, steps=STEPS["hkmr"], lr=1e-3)
    elapsed = time.perf_counter() - start
    (loss0, mpjpe0), (loss1, mpjpe1) = history[0], history[-1]
    print(f"HKMR head: loss {loss0:.4f} -> {loss1:.4f} ({loss0 / loss1:.1f}x), "
          f"MPJPE {mpjpe0:.1f} -> {mpjpe1:.1f} mm ({mpjpe0 / mpjpe1:.1f}x) in {elapsed:.1f} s")
    assert loss1 < loss0 / 5
    assert mpjpe1 < mpjpe0 / 5

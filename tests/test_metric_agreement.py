"""One implementation of every metric: metrics.json, ``load_run(...).summary()`` and a recomputation with
``occbench.metrics`` agree to 1e-6 mm; the engine's per-window rows equal ``occbench.metrics`` applied to the
same predictions; the rule for rows with fewer than 3 evaluated joints is the same everywhere."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import occbench
from occbench import metrics
from occbench.runner import Runner

TOL_MM = 1e-6


@pytest.fixture(scope="module")
def recorded_run(pare_demo, demo_set, tmp_path_factory):
    """An advocc40 run (visible-joint masking, worst window, pooled reduction) with every forward recorded."""
    calls = []
    original = Runner.__call__

    def recording(self, images, *args, **kwargs):
        out = original(self, images, *args, **kwargs)
        calls.append([t.clone() for t in out])
        return out

    Runner.__call__ = recording
    try:
        out = occbench.run_protocol(pare_demo, demo_set, "advocc40", tmp_path_factory.mktemp("agree") / "run",
                                    limit=3,
                                    batch_size=7, memory_format="contiguous", chunk_samples=1, max_windows=20,
                                    progress=False, quiet=True)
    finally:
        Runner.__call__ = original
    return out, calls


def test_metrics_json_summary_and_metrics_module_agree(recorded_run, pare_demo, demo_set):
    run_dir, _ = recorded_run
    stored = json.loads((run_dir / "metrics.json").read_text())
    run = occbench.load_run(run_dir)
    summary = run.summary(n_boot=0).set_index(["source", "metric"])["value"]
    for source in ("clean", "occluded", "worst"):
        for metric in ("mpjpe", "pa_mpjpe"):
            assert abs(stored[source][metric][run.reduction] - summary[(source, metric)]) < TOL_MM
        assert abs(stored[source]["pckh"] - summary[(source, "pckh")]) < TOL_MM
    for reduction in metrics.REDUCTIONS:
        assert abs(stored["occluded"]["mpjpe"][reduction]
                   - run.metric_estimate("mpjpe", "occluded", reduction, n_boot=0)[0]) < TOL_MM

    # the clean numbers again, from the stored predictions, with occbench.metrics alone
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    pred3d, gt3d, pred2d, gt2d, valid2d = [], [], [], [], []
    with torch.no_grad():
        for _, row in predictions.iterrows():
            rotmat = torch.as_tensor(np.stack(row["rotmat"]), dtype=torch.float32).view(1, 24, 3, 3)
            betas = torch.as_tensor(np.asarray(row["betas"]), dtype=torch.float32).view(1, 10)
            cam = torch.as_tensor(np.asarray(row["cam"]), dtype=torch.float32).view(1, 3)
            pred = pare_demo.prediction_from_params(rotmat, betas, cam)
            pred3d.append(metrics.align_pelvis(pred.joints_lsp, "h36m-root", pelvis=pred.joints_h36m[:, 0]))
            pred2d.append(pred.joints2d)
            sample = demo_set[int(row["sample_index"])]
            gt3d.append(torch.as_tensor(sample.joints3d)[None])
            gt2d.append(torch.as_tensor(sample.joints2d, dtype=torch.float32)[None])
            valid2d.append(torch.as_tensor(sample.joints2d_valid)[None])
    pred3d, gt3d, pred2d, gt2d, valid2d = map(torch.cat, (pred3d, gt3d, pred2d, gt2d, valid2d))
    visible = torch.ones(len(pred3d), 14, dtype=torch.bool)
    # stored per-joint errors are float32; PA-MPJPE is fitted in float64 (as the engine does) before that
    pa = metrics.pa_mpjpe(pred3d.double(), gt3d.double()).float()
    for metric, errors in (("mpjpe", metrics.mpjpe(pred3d, gt3d)), ("pa_mpjpe", pa)):
        for reduction in metrics.REDUCTIONS:
            # the stored errors are float32; their means are float64 (a float32 mean would round by ~4e-6 mm)
            value = float(metrics.reduce(errors.double(), visible, reduction))
            assert abs(value - stored["clean"][metric][reduction]) < TOL_MM, (metric, reduction)
    head = metrics.head_size_lsp14(gt2d, valid2d)
    correct = metrics.pckh(pred2d, gt2d, head, valid2d)
    mean, _ = metrics.pckh_accuracy(correct, valid2d, head)
    assert abs(100 * float(mean) - stored["clean"]["pckh"]) < TOL_MM


def test_engine_rows_equal_metrics_on_the_same_predictions(recorded_run, demo_set):
    """Every stored row (clean and window) is occbench.metrics applied to the prediction the model made."""
    run_dir, calls = recorded_run
    joints = pd.read_parquet(run_dir / "joints.parquet")
    # per chunk (one sample each): the clean call, then the window batches, in row order
    rows = joints["joint"].to_numpy().reshape(-1, 14)
    assert (rows == np.arange(14)).all()
    flat = [torch.cat(parts) for parts in zip(*calls)]
    pred3d, root, pred2d = flat
    # the autotune is off (batch size given), so the recorded calls are exactly the run's forwards
    assert len(pred3d) == len(joints) // 14
    sample_index = joints["sample_index"].to_numpy()[::14]
    visible = torch.as_tensor(np.array(joints["visible"].to_numpy()).reshape(-1, 14))
    gt3d = torch.stack([torch.as_tensor(demo_set[int(i)].joints3d) for i in sample_index])
    aligned = metrics.align_pelvis(pred3d, "h36m-root", pelvis=root)
    expected_mpjpe = metrics.mpjpe(aligned, gt3d).numpy()
    expected_pa = metrics.mpjpe(metrics.procrustes_align(aligned.double(), gt3d.double(), visible),
                                gt3d.double()).float().numpy()
    np.testing.assert_array_equal(joints["mpjpe"].to_numpy().reshape(-1, 14), expected_mpjpe)
    np.testing.assert_array_equal(joints["pa_mpjpe"].to_numpy().reshape(-1, 14), expected_pa)


def test_rows_with_fewer_than_three_evaluated_joints_have_no_pa_mpjpe():
    """The one rule, everywhere: no PA-MPJPE for a row with 1-2 evaluated joints; left out of PA reductions
    (and counted), while its MPJPE still counts."""
    torch.manual_seed(0)
    gt = torch.randn(2, 14, 3) * 0.3
    pred = gt + 0.05 * torch.randn(2, 14, 3)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[1, 2:] = False                                   # row 1: two evaluated joints
    pa = metrics.pa_mpjpe(pred, gt, mask)
    assert torch.isnan(pa[1]).all() and torch.isfinite(pa[0]).all()
    pa_mask = metrics.pa_mask(mask)
    assert pa_mask[0].all() and not pa_mask[1].any()
    assert torch.isclose(metrics.reduce(pa, pa_mask), pa[0].mean())
    assert torch.isnan(metrics.reduce(pa, mask))          # a NaN at an evaluated joint is never dropped silently
    mp = metrics.mpjpe(pred, gt, mask)
    assert torch.isclose(metrics.reduce(mp, mask), (mp[0].mean() + mp[1, :2].mean()) / 2)


def test_reductions_over_windows_follow_the_documented_rule():
    errors = torch.tensor([[1.0, 3.0], [5.0, 7.0], [10.0, 20.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    sample = torch.tensor([0, 0, 1])
    # per-sample: rows (2, 5) -> sample 0 = 3.5; sample 1 = 15; mean 9.25
    assert float(metrics.reduce(errors, mask, "per-sample", sample=sample)) == pytest.approx(9.25)
    # pooled: (1 + 3 + 5 + 10 + 20) / 5
    assert float(metrics.reduce(errors, mask, "pooled-visible", sample=sample)) == pytest.approx(7.8)
    samples, num, den = metrics.sample_terms(errors, mask, sample, "pooled-visible")
    assert samples.tolist() == [0, 1] and num.tolist() == [9.0, 30.0] and den.tolist() == [3.0, 2.0]

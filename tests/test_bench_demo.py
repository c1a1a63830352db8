"""bench/bench_demo_model.py's figures on a hand-made run with known errors."""
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_demo_model.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_demo_model", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_on_off_ratio_hidden_joints_and_the_information_loss_ceiling(bench, tmp_path):
    # one sample, 14 joints at 10 mm clean; window 0 is centred on the body and hides joints 0 and 1
    # (110 mm each), window 1 lies far off the body and changes nothing
    rows = []
    for window, cx, error_of in ((-1, np.nan, lambda j: 10.0), (0, 50.0, lambda j: 110.0 if j < 2 else 10.0),
                                 (1, 200.0, lambda j: 10.0)):
        for joint in range(14):
            rows.append({"sample_index": 0, "window": window, "joint": joint, "mpjpe": error_of(joint),
                         "visible": True, "occluded": window == 0 and joint < 2, "occ_cx": cx, "occ_cy": cx,
                         "x0": cx - 20, "y0": cx - 20, "size": 40.0})
    pd.DataFrame(rows).to_parquet(tmp_path / "joints.parquet")
    labels = np.zeros((1, 224, 224), np.uint8)
    labels[0, 40:60, 40:60] = 19                        # SMPL part 18 (left forearm) + 1
    figures = bench.sensitivity(tmp_path, 224, labels, mean_pose_joint_error=np.full((1, 14), 50.0))
    on, off = (2 * 110 + 12 * 10) / 14, 10.0
    assert figures["windows_on_body"] == 1 and figures["windows_clear_of_body"] == 1
    assert figures["on_body_mpjpe"] == pytest.approx(on) and figures["off_body_mpjpe"] == pytest.approx(off)
    assert figures["ratio_on_off"] == pytest.approx(on / off)
    assert figures["on_body_rise"] == pytest.approx(on - 10.0) and figures["off_body_rise"] == pytest.approx(0.0)
    assert figures["ratio_rise_on_off"] == float("inf")
    assert figures["hidden_joints"] == 2 and figures["ratio_hidden_vs_clean"] == pytest.approx(11.0)
    # the ceiling gives the hidden joints the mean-pose error (50 mm), every other joint its clean error
    assert figures["ratio_on_off_if_hidden_joints_lost"] == pytest.approx((2 * 50 + 12 * 10) / 14 / 10)
    # a model failing only locally: on / off = (2 * max(50, c) + 12 c) / 14 / c = 1.5 at c = 100 / 9 mm
    assert figures["clean_error_for_1_5_if_failing_locally"] == pytest.approx(100 / 9, rel=1e-6)
    # by region: the on-body window lies on a forearm, and all of its rise is in the two joints it hides
    forearm = figures["by_region"]["forearms and hands"]
    assert forearm["windows"] == 1 and forearm["hidden_joints_per_window"] == 2
    assert forearm["rise_over_clean"] == pytest.approx(on - 10.0)
    assert forearm["share_of_rise_in_hidden_joints"] == pytest.approx(1.0)
    assert figures["by_region"]["off body"]["rise_over_clean"] == pytest.approx(0.0)


def test_clean_error_for_local_ratio_is_nan_when_out_of_reach(bench):
    # the on-body window hides nothing: no clean error makes a locally failing model reach 1.5
    window_of_row = np.repeat([0, 1], 14)
    hidden = np.zeros(28, bool)
    value = bench.clean_error_for_local_ratio(window_of_row, np.array([True, False]), hidden, np.full(28, 80.0))
    assert np.isnan(value)
    hidden[:3] = True                                   # 3 of 14 joints lost at 80 mm: (240 + 11 c) / 14 = 1.5 c
    value = bench.clean_error_for_local_ratio(window_of_row, np.array([True, False]), hidden, np.full(28, 80.0))
    assert value == pytest.approx(240 / 10, rel=1e-6)


def test_worst_window_vs_clean_reads_the_headline_and_published_ratios_are_sane(bench, tmp_path):
    (tmp_path / "metrics.json").write_text('{"headline": {"mpjpe": 150.0, "clean_mpjpe": 60.0}}')
    figures = bench.worst_window_vs_clean(tmp_path)
    assert figures["advocc40_worst_vs_clean"] == pytest.approx(2.5)
    # 3DNBF Table 1: every official model is worse at its worst 40 px window than clean, 3DNBF the least
    ratios = {name: occ / clean for name, (clean, occ) in bench.PUBLISHED_ADVOCC40.items()}
    assert min(ratios, key=ratios.get) == "3DNBF" and max(ratios, key=ratios.get) == "SPIN"
    assert ratios["PARE"] == pytest.approx(126.5 / 81.4)

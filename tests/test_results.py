"""Aggregation on run directories with known errors: the numbers the report shows are computed here."""
import numpy as np
import pytest
from runfactory import N_J, const, write_run

from occbench.errors import UserError
from occbench.heatmaps import window_map
from occbench.results import JOINT_NAMES, bootstrap_ratio, compare_runs, load_run


def test_summary_per_sample_values_and_degradation(tmp_path):
    run_dir = write_run(tmp_path / "r", errors=[{-1: const(10), 0: const(20), 1: const(40)},
                                                {-1: const(30), 0: const(50), 1: const(50)}])
    run = load_run(run_dir)
    table = run.summary(n_boot=200).set_index(["source", "metric"])
    assert table.loc[("clean", "mpjpe"), "value"] == pytest.approx(20.0)          # (10 + 30) / 2
    assert table.loc[("occluded", "mpjpe"), "value"] == pytest.approx(40.0)       # (30 + 50) / 2
    assert table.loc[("occluded", "mpjpe"), "delta_vs_clean"] == pytest.approx(20.0)
    assert table.loc[("occluded", "mpjpe"), "delta_pct"] == pytest.approx(100.0)
    assert table.loc[("occluded", "pa_mpjpe"), "value"] == pytest.approx(20.0)
    low, high = table.loc[("occluded", "mpjpe"), ["ci_low", "ci_high"]]
    assert 30.0 <= low <= 40.0 <= high <= 50.0


def test_pooled_visible_differs_from_per_sample(tmp_path):
    vis_a = np.zeros(N_J, bool)
    vis_a[:2] = True                      # sample 0: only 2 visible joints at error 100
    errors = [{-1: const(0), 0: const(100)}, {-1: const(0), 0: const(10)}]
    visible = [{-1: np.ones(N_J, bool), 0: vis_a}, {-1: np.ones(N_J, bool), 0: np.ones(N_J, bool)}]
    protocol = {"name": "advocc80", "kind": "advocc", "report": "worst", "reduction": "pooled-visible",
                "indexing": "top-left"}
    run = load_run(write_run(tmp_path / "r", protocol=protocol, errors=errors, visible=visible))
    pooled = run.metric_estimate("mpjpe", "worst", "pooled-visible", n_boot=0)[0]
    per_sample = run.metric_estimate("mpjpe", "worst", "per-sample", n_boot=0)[0]
    assert pooled == pytest.approx((2 * 100 + 14 * 10) / 16)
    assert per_sample == pytest.approx(55.0)
    assert run.source == "worst" and run.headline()["mpjpe"] == pytest.approx(pooled)


def test_worst_window_and_per_joint(tmp_path):
    err = const(10)
    err[3] = 90
    run = load_run(write_run(tmp_path / "r", errors=[{-1: const(5), 0: const(10), 1: err}],
                             protocol={"name": "a", "kind": "advocc", "report": "worst",
                                       "reduction": "per-sample", "indexing": "top-left"}))
    table = run.per_joint()
    assert table.loc[3, "worst"] == pytest.approx(90) and table.loc[0, "worst"] == pytest.approx(10)
    assert table.loc[3, "clean"] == pytest.approx(5)
    assert list(table["joint_name"]) == list(JOINT_NAMES)


def test_pckh_is_per_joint_then_mean(tmp_path):
    # joint 0 correct in sample 0 only; other joints always correct -> per joint 0.5 and 1.0
    e0, e1 = const(10), const(10)
    e1[0] = 500
    run = load_run(write_run(tmp_path / "r", errors=[{-1: e0}, {-1: e1}],
                             protocol={"name": "clean", "kind": "clean", "reduction": "per-sample"}))
    value = run.metric_estimate("pckh", "clean", n_boot=0)[0]
    assert value == pytest.approx(100 * (0.5 + 13) / 14)


def test_doc_curve(tmp_path):
    errors = [{-1: const(0), 0: const(10), 1: const(30), 2: const(20)}]
    run = load_run(write_run(tmp_path / "r", errors=errors, doc={0: 1, 1: 2, 2: 1},
                             pattern={0: "bar", 1: "bar", 2: "circle"},
                             protocol={"name": "doc-sweep", "kind": "hkmr", "report": "mean",
                                       "reduction": "per-sample"}))
    curve = run.doc_curve(n_boot=0).set_index(["pattern", "doc"])["mpjpe"]
    assert curve[("bar", 1)] == 10 and curve[("bar", 2)] == 30 and curve[("circle", 1)] == 20


def test_heatmap_places_errors_at_window_anchors(tmp_path):
    anchors = {0: (0.0, 0.0), 1: (112.0, 0.0), 2: (0.0, 112.0), 3: (112.0, 112.0)}
    errors = [{-1: const(0), 0: const(1), 1: const(2), 2: const(3), 3: const(4)}]
    run = load_run(write_run(tmp_path / "r", errors=errors, anchors=anchors))
    maps, names = run.heatmaps()
    assert maps.shape == (15, 224, 224) and names[-1] == "mean"
    assert maps[-1, 10, 10] == 1 and maps[-1, 10, 200] == 2 and maps[-1, 200, 10] == 3 and maps[-1, 200, 200] == 4


def test_window_map_center_indexing_interpolates():
    values = np.array([0.0, 10.0])
    out = window_map(values, np.array([20.0, 120.0]), np.array([50.0, 50.0]), "center")
    assert out[50, 20] == pytest.approx(0.0, abs=0.1) and out[50, 70] == pytest.approx(5.0, abs=0.1)
    assert out[0, 0] == pytest.approx(0.0) and out[0, 223] == pytest.approx(10.0)


def test_compare_flags_convention_differences(tmp_path):
    a = write_run(tmp_path / "a", model="a", errors=[{-1: const(10), 0: const(20)}])
    b = write_run(tmp_path / "b", model="b", errors=[{-1: const(10), 0: const(30)}],
                  conventions={"pelvis": "mid-hip"})
    comparison = compare_runs([a, b], n_boot=0)
    assert any("pelvis" in flag for flag in comparison.flags)
    assert list(comparison.table["model"]) == ["a", "b"]
    assert "| a |" in comparison.to_markdown().replace("  ", " ")
    same = compare_runs([a, write_run(tmp_path / "c", model="c", errors=[{-1: const(1), 0: const(2)}])], n_boot=0)
    assert same.flags == []


def test_tidy_form(tmp_path):
    run = load_run(write_run(tmp_path / "r", errors=[{-1: const(10), 0: const(20)}]))
    tidy = run.tidy()
    assert list(tidy.columns) == ["model", "protocol", "dataset", "sample", "window", "joint", "metric", "value"]
    assert len(tidy) == 2 * N_J * 3


def test_bootstrap_ratio_and_errors(tmp_path):
    est, low, high = bootstrap_ratio(np.array([1.0, 2, 3, 4]), np.ones(4), n_boot=500)
    assert est == 2.5 and low < 2.5 < high
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tmp_path)


def test_pve_is_one_value_per_window(tmp_path):
    import pandas as pd
    run_dir = write_run(tmp_path / "r", errors=[{-1: const(10), 0: const(20)}, {-1: const(10), 0: const(20)}])
    joints = pd.read_parquet(run_dir / "joints.parquet")
    joints["pve"] = np.where(joints["window"] < 0, 30.0, 60.0 + 20.0 * joints["sample_index"])
    joints.loc[joints["joint"] == 0, "visible"] = False       # visibility of joints must not matter for PVE
    joints.to_parquet(run_dir / "joints.parquet")
    table = load_run(run_dir).summary(n_boot=0).set_index(["source", "metric"])
    assert table.loc[("clean", "pve"), "value"] == pytest.approx(30.0)
    assert table.loc[("occluded", "pve"), "value"] == pytest.approx(70.0)


def test_rise_heatmap_subtracts_each_samples_clean_error(tmp_path):
    anchors = {0: (0.0, 0.0), 1: (112.0, 112.0)}
    errors = [{-1: const(10), 0: const(30), 1: const(10)},      # clean 10: the first window adds 20
              {-1: const(50), 0: const(60), 1: const(50)}]      # clean 50: the first window adds 10
    run = load_run(write_run(tmp_path / "r", errors=errors, anchors=anchors))
    error, _ = run.heatmaps()
    rise, _ = run.heatmaps(rise=True)
    assert error[-1, 10, 10] == 45 and rise[-1, 10, 10] == 15 and rise[-1, 200, 200] == 0
    one, _ = run.heatmaps("s1", rise=True)
    assert one[3, 10, 10] == 10 and one[3, 200, 200] == 0

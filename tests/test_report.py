"""The HTML report: built from runs with known errors, opened in headless Chromium."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
from runfactory import const, write_predictions, write_run

from occbench.heatmaps import color_range
from occbench.report import heatmap_panels, write_report
from occbench.results import JOINT_NAMES, load_run
from occbench.sensmesh import accumulate_run

ARTIFACTS = Path(__file__).resolve().parents[1] / "reports" / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--enable-unsafe-swiftshader", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def grid_run(path, model, centre_error, protocol=None, clean=10):
    """6x6 occsens40 grid: windows over the crop centre (where the body is) cost ``centre_error`` mm."""
    errors, anchors = {-1: const(clean)}, {}
    for w in range(36):
        x0, y0 = 40.0 * (w % 6), 40.0 * (w // 6)
        anchors[w] = (x0, y0)
        on_body = 60 <= x0 + 20 <= 164 and 20 <= y0 + 20 <= 204
        errors[w] = const(centre_error if on_body else 12)
    run = write_run(path, model=model, errors=[errors, errors], anchors=anchors, protocol=protocol,
                    conventions={"pelvis": "h36m-root", "body_model_standin": True})
    write_predictions(run, 2)
    return run


def test_sensitivity_mesh_concentrates_on_occluded_body(tmp_path):
    from occbench.body import load_body_model
    run = load_run(grid_run(tmp_path / "a", "a", 200))
    body = load_body_model()
    values = accumulate_run(run, body, pd.read_parquet(run.path / "predictions.parquet"), JOINT_NAMES).mean()
    assert values.shape == (6890, 15)
    covered = np.isfinite(values[:, -1])
    assert 0.2 < covered.mean() < 0.9           # front vertices covered, back vertices hidden
    assert np.nanmean(values[:, -1]) > 100      # the body sits under the expensive windows


def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    return path


def test_report_renders_in_headless_chromium(tmp_path):
    runs = [grid_run(tmp_path / "a", "model-a", 200), grid_run(tmp_path / "b", "model-b", 50)]
    index = write_report(runs, tmp_path / "report", heatmap_samples=1)
    text = index.read_text()
    for needle in ("Summary", "Occlusion sensitivity heatmaps", "Occlusion sensitivity meshes", "Per-joint",
                   "model-a", "model-b", "data:image/png;base64", 'class="occmesh"', "Not comparable"):
        assert needle in text, needle
    assert "http://" not in text and "https://" not in text          # opens offline
    assert len(list((tmp_path / "report" / "meshes").glob("*.glb"))) == 2 * 15

    browser = chromium()
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--enable-logging=stderr", "--v=0", "--dump-dom", index.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert 'data-ready="1"' in dom.stdout            # the WebGL mesh viewer ran to the end
    assert dom.stdout.count("<table") >= 3 and dom.stdout.count("<img") >= 6
    console_errors = [line for line in dom.stderr.splitlines()
                      if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)]
    assert console_errors == []

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1200,3000",
                    f"--screenshot={shot}", index.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_mesh_colour_range_is_shared_tight_and_ignores_uncovered_vertices():
    from occbench.report import _shared_range
    a = np.concatenate([np.linspace(60, 80, 101), [np.nan] * 5])            # one model's mean mesh
    b = np.linspace(70, 90, 101)                                             # another model's
    low, high = _shared_range([a, b])
    assert 60 < low < 61 and 89 < high < 90                                  # 1st-99th percentile of both
    assert _shared_range([np.full(4, np.nan)]) == (0.0, 1.0)
    assert _shared_range([np.full(4, 70.0)]) == (70.0, 71.0)                 # never an empty range


ADVOCC = {"name": "advocc80", "kind": "advocc", "report": "worst", "reduction": "pooled-visible",
          "indexing": "top-left"}


def test_heatmap_colour_ranges_are_per_protocol_and_shared_by_models(tmp_path):
    runs = [load_run(grid_run(tmp_path / "a", "model-a", 40, clean=30)),
            load_run(grid_run(tmp_path / "b", "model-b", 50, clean=30)),
            load_run(grid_run(tmp_path / "c", "model-a", 430, protocol=ADVOCC))]   # AdvOcc's worst windows
    panels = heatmap_panels(runs, n_samples=1)
    assert list(panels) == ["occsens40", "advocc80"]
    members, maps, ranges = panels["occsens40"]
    assert [r.model for r in members] == ["model-a", "model-b"]
    # the occsens maps keep their own scale: 12..50 mm, not AdvOcc's 430 mm
    low, high = ranges["mean_error"]
    assert 12 <= low < 13 and 49 < high <= 50
    low, high = ranges["mean_rise"]            # rise over the clean 30 mm: -18 off the body, +20 on it
    assert -18 <= low < -17 and 19 < high <= 20
    assert panels["advocc80"][2]["mean_error"][1] > 400
    for run_maps in maps:
        assert set(run_maps) >= {"mean_error", "mean_rise", "sample_error", "sample_rise"}
        for kind in ("mean_error", "mean_rise", "sample_error", "sample_rise"):
            assert all(np.isfinite(m).all() for m in run_maps[kind])


def test_report_draws_error_and_rise_maps_per_run(tmp_path):
    runs = [grid_run(tmp_path / "a", "model-a", 200), grid_run(tmp_path / "c", "model-c", 430, protocol=ADVOCC)]
    index = write_report(runs, tmp_path / "report", heatmap_samples=1, meshes=False)
    text = index.read_text()
    # each caption appears twice: the image's alt text and its caption
    assert text.count("rise over its clean error") == 4 and text.count("rise over the clean error, averaged") == 4
    assert "occsens40: colour ranges shared by every model" in text and "advocc80: colour ranges" in text
    heat = sorted((tmp_path / "report").glob("heatmap_*.png"))
    assert len(heat) == 2 * 4                   # per run: average rise, average error, one sample's rise and error
    import matplotlib.image as mpimg
    pixels = mpimg.imread(heat[0])[..., :3]
    assert pixels.std() > 0.05                  # not one flat colour


def test_color_range_percentiles_never_empty():
    values = np.arange(101.0)
    assert color_range([values], 1, 99) == (1.0, 99.0)
    assert color_range([values[:50], values[50:]]) == (0.0, 100.0)
    assert color_range([np.full(3, 7.0)]) == (7.0, 8.0)
    assert color_range([np.full(3, np.nan)]) == (0.0, 1.0)

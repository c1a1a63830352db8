"""The adaptive worst-window search (occbench.search) on synthetic error surfaces with a known worst window:
smooth bumps, plateaus and ties (first index among equals, as the exhaustive argmax), two peaks, NaN windows,
many samples searched together; then in the engine (``run_protocol(..., search="adaptive")``): a real
pare-demo run whose rows equal the exhaustive run's rows for the windows both evaluated, what run.json, the
report and compare_runs say, bad requests."""
from __future__ import annotations

import json

import numpy as np
import pytest

from occbench.errors import UserError
from occbench.search import AdaptiveSearch, SearchParams, coarse_windows, search_worst_windows


def exhaustive_worst(surface: np.ndarray) -> int:
    """The engine's rule: argmax of the scores with NaN as -inf, the first window among equals."""
    return int(np.argmax(np.nan_to_num(surface.reshape(-1), nan=-np.inf)))


def run(surface: np.ndarray, params: SearchParams = SearchParams()) -> AdaptiveSearch:
    n_rows, n_cols = surface.shape
    flat = surface.reshape(-1)
    search = AdaptiveSearch(n_rows, n_cols, params)
    asked = []
    while not search.done:
        windows = search.next_windows()
        asked.extend(windows.tolist())
        search.report(windows, flat[windows])
    assert len(asked) == len(set(asked)) == search.n_evaluated     # no window evaluated twice
    return search


def bump(n_rows, n_cols, row, col, width, height=1.0):
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    return height * np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2.0 * width ** 2))


def test_coarse_grid_is_centred_and_covers_the_border():
    assert coarse_windows(16, 16, 3).tolist()[:6] == [0, 3, 6, 9, 12, 15]         # 15 = 5 x 3: both borders
    first_row = coarse_windows(21, 21, 3)[:7]                                     # 20 % 3 = 2: offset 1
    assert first_row.tolist() == [22, 25, 28, 31, 34, 37, 40]
    assert len(coarse_windows(20, 20, 3)) == 49 and len(coarse_windows(5, 7, 1)) == 35


@pytest.mark.parametrize("shape,peak", [((20, 20), (13, 7)), ((16, 16), (0, 15)), ((21, 21), (20, 0)),
                                        ((20, 20), (10, 10))])
def test_smooth_bump_worst_window_found_with_few_forwards(shape, peak):
    rng = np.random.default_rng(0)
    surface = 80.0 + 300.0 * bump(*shape, *peak, width=2.5) + rng.uniform(0, 5.0, shape)
    search = run(surface)
    assert search.best_window == exhaustive_worst(surface) == peak[0] * shape[1] + peak[1]
    assert search.best_score == surface[peak]
    assert search.n_evaluated * 3 <= surface.size


def test_plateau_gives_the_first_index_among_equals():
    surface = 50.0 + 100.0 * bump(20, 20, 12, 12, width=4.0)
    surface[9:15, 8:14] = surface.max() + 1.0            # a flat top, 6 x 6 windows of equal score
    search = run(surface)
    assert search.best_window == exhaustive_worst(surface) == 9 * 20 + 8


def test_exact_tie_between_two_separate_peaks_goes_to_the_lower_index():
    surface = 50.0 + 100.0 * (bump(20, 20, 4, 15, 2.0) + bump(20, 20, 15, 4, 2.0))
    surface[4, 15] = surface[15, 4] = 200.0
    search = run(surface, SearchParams(top=4))
    assert search.best_window == exhaustive_worst(surface) == 4 * 20 + 15


def test_two_peaks_the_higher_narrower_one_wins():
    # a broad hill that dominates the coarse grid, and a narrower but higher peak elsewhere
    surface = 60.0 + 100.0 * bump(20, 20, 5, 5, width=5.0) + 160.0 * bump(20, 20, 16, 14, width=1.5)
    search = run(surface)
    assert search.best_window == exhaustive_worst(surface) == 16 * 20 + 14
    # with a single climber only the broad hill is followed: the parameter matters
    single = run(surface, SearchParams(coarse_stride=5, top=1))
    assert single.best_window == 5 * 20 + 5


def test_nan_windows_rank_below_numbers_and_all_nan_gives_window_zero():
    surface = 50.0 + 100.0 * bump(20, 20, 8, 8, 3.0)
    surface[8, 8] = np.nan                                 # no visible joint in the peak window
    assert run(surface).best_window == exhaustive_worst(surface) != 8 * 20 + 8
    empty = np.full((21, 21), np.nan)
    search = run(empty)
    assert search.best_window == exhaustive_worst(empty) == 0 and np.isnan(search.best_score)


def test_random_smooth_surfaces_match_the_exhaustive_argmax():
    rng = np.random.default_rng(1)
    fewer = []
    for trial in range(40):
        shape = (20, 20) if trial % 2 else (16, 16)
        surface = 80.0 + rng.uniform(0, 1, shape)
        for _ in range(3):
            surface += rng.uniform(50, 300) * bump(*shape, *rng.uniform(0, shape[0] - 1, 2), rng.uniform(2.0, 4.0))
        search = run(surface)
        assert search.best_window == exhaustive_worst(surface), trial
        fewer.append(surface.size / search.n_evaluated)
    assert min(fewer) >= 2.0 and np.mean(fewer) >= 3.0


def test_the_top_windows_end_with_every_neighbour_evaluated():
    rng = np.random.default_rng(2)
    surface = rng.uniform(0, 100, (16, 16))                # no structure at all: still a local certificate
    params = SearchParams(coarse_stride=4, top=3, radius=2)
    search = run(surface, params)
    for window in search.ranked()[:3]:
        row, col = divmod(int(window), 16)
        assert search.evaluated.reshape(16, 16)[max(0, row - 2):row + 3, max(0, col - 2):col + 3].all()
    assert search.best_score == surface.reshape(-1)[search.evaluated].max()


def test_coarse_stride_one_is_the_exhaustive_search():
    surface = np.random.default_rng(3).uniform(0, 100, (16, 16))
    search = run(surface, SearchParams(coarse_stride=1))
    assert search.n_evaluated == 256 and search.best_window == exhaustive_worst(surface)


def test_many_samples_are_asked_together_each_round():
    surfaces = [50.0 + 200.0 * bump(20, 20, 3, 17, 2.5), 50.0 + 200.0 * bump(16, 16, 9, 2, 2.0),
                np.full((16, 16), 7.0)]
    calls = []

    def evaluate(requests):
        calls.append([len(w) for w in requests])
        return [s.reshape(-1)[w] for s, w in zip(surfaces, requests)]

    searches = search_worst_windows([s.shape for s in surfaces], evaluate, SearchParams(radius=1))
    assert [s.best_window for s in searches] == [exhaustive_worst(s) for s in surfaces]
    assert calls[0] == [49, 36, 36]                         # the coarse grids of all three in one call
    assert [sum(c[i] for c in calls) for i in range(3)] == [s.n_evaluated for s in searches]
    assert len(calls) == max(s.rounds for s in searches) and calls[-1].count(0) >= 1   # the flat one is done


def test_reports_and_parameters_are_checked():
    search = AdaptiveSearch(16, 16)
    windows = search.next_windows()
    with pytest.raises(ValueError, match="report the 36 windows"):
        search.report(windows[:-1], np.zeros(len(windows) - 1))
    with pytest.raises(ValueError, match="report the 36 windows"):
        search.report(np.r_[windows[:-1], 1], np.zeros(len(windows)))
    with pytest.raises(UserError, match="coarse_stride = 0: must be an integer >= 1"):
        SearchParams(coarse_stride=0)
    with pytest.raises(UserError, match="top"):
        SearchParams(top=2.5)
    assert SearchParams().record() == {"search": "adaptive", "coarse_stride": 3, "top": 4, "radius": 2}


# ------------------------------------------------------------------------------------------ in the engine
def _key(joints):
    return joints.set_index(["sample_id", "window", "joint"]).sort_index()


ERROR_COLUMNS = ["mpjpe", "pa_mpjpe", "pckh", "err_x", "err_y", "err_z", "pve"]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, single_thread):
    """pare-demo on the first 2 demo samples, advocc40 at its 96 px input (400 windows): exhaustive, adaptive."""
    from occbench.data import open_dataset
    from occbench.engine import run_protocol
    from occbench.zoo import load_model
    model, data = load_model("pare-demo", device="cpu"), open_dataset("demo")
    out = tmp_path_factory.mktemp("search")
    kwargs = dict(seed=0, limit=2, batch_size=32, memory_format="contiguous", quiet=True)
    return (run_protocol(model, data, "advocc40", out / "exhaustive", **kwargs),
            run_protocol(model, data, "advocc40", out / "adaptive", search="adaptive", **kwargs))


def test_adaptive_run_keeps_the_exhaustive_rows_of_the_windows_it_evaluated(demo_runs):
    import pandas as pd
    exhaustive, adaptive = demo_runs
    full, searched = (_key(pd.read_parquet(run / "joints.parquet")) for run in demo_runs)
    assert searched.index.isin(full.index).all() and searched.index.is_unique
    same = full.loc[searched.index]
    # the occluder of a window (position, texture draw) and its joint masks are the exhaustive run's, exactly
    for column in searched.columns.difference(ERROR_COLUMNS):
        assert (searched[column].to_numpy() == same[column].to_numpy()).all(), column
    # errors: the same images through other forward batch sizes (float rounding of batched convolutions)
    np.testing.assert_allclose(searched[ERROR_COLUMNS].to_numpy(), same[ERROR_COLUMNS].to_numpy(), atol=1e-3)

    samples = {name: pd.read_parquet(run / "samples.parquet").set_index("sample_id")
               for name, run in zip(("exhaustive", "adaptive"), demo_runs)}
    assert (samples["exhaustive"]["n_windows"] == 400).all()
    assert (samples["adaptive"]["n_windows"] * 3 < 400).all()          # >= 3x fewer forwards on these two
    assert (samples["adaptive"]["worst_window"] == samples["exhaustive"]["worst_window"]).all()
    np.testing.assert_allclose(samples["adaptive"]["worst_mpjpe"], samples["exhaustive"]["worst_mpjpe"], rtol=1e-5)
    # samples.parquet's worst window is the best the search found among the rows it kept
    occluded = searched.reset_index()
    occluded = occluded[(occluded["window"] >= 0) & occluded["visible"]]
    per_window = occluded.groupby(["sample_id", "window"])["mpjpe"].mean()
    for sample_id, row in samples["adaptive"].iterrows():
        assert row["worst_window"] == per_window[sample_id].idxmax()
        assert row["n_windows"] == len(per_window[sample_id])


def test_adaptive_run_is_recorded_reported_and_flagged(demo_runs):
    from occbench.results import compare_runs, load_run
    from occbench.scoring import format_summary
    exhaustive, adaptive = demo_runs
    config = json.loads((adaptive / "run.json").read_text())
    assert config["search"] == {"search": "adaptive", "coarse_stride": 3, "top": 4, "radius": 2}
    cost = config["search_cost"]
    assert cost["grid_windows_per_sample"] == 400 and cost["windows"] == 2 * cost["windows_per_sample"]
    assert cost["fewer_forwards"] == pytest.approx(400 / cost["windows_per_sample"], rel=1e-3) and \
        cost["fewer_forwards"] > 3
    assert "search" not in json.loads((exhaustive / "run.json").read_text())
    note = load_run(adaptive).search_note
    assert note.startswith("adaptive worst-window search (coarse stride 3, top 4, radius 2): ") and \
        "of 400 windows per sample" in note and note in load_run(adaptive).warnings()
    assert load_run(exhaustive).search_note == "" and note not in load_run(exhaustive).warnings()
    metrics = json.loads((adaptive / "metrics.json").read_text())
    assert f"{cost['windows_per_sample']} of 400 windows per sample" in format_summary(config, metrics)
    flags = compare_runs([exhaustive, adaptive], n_boot=10).flags
    assert any("worst windows searched differently" in f and "adaptive" in f for f in flags)
    assert not any("searched differently" in f for f in compare_runs([exhaustive, exhaustive], n_boot=10).flags)


def test_adaptive_rows_are_bit_identical_at_batch_size_one(tmp_path, single_thread):
    import pandas as pd
    from test_engine import TinyDataset, tiny_model
    from occbench.engine import run_protocol
    kwargs = dict(batch_size=1, memory_format="contiguous", quiet=True, protocol_overrides={"stride": 20})
    full = run_protocol(tiny_model(), TinyDataset(2), "advocc40", tmp_path / "exhaustive", **kwargs)
    searched = run_protocol(tiny_model(), TinyDataset(2), "advocc40", tmp_path / "adaptive", search="adaptive",
                            **kwargs)
    full, searched = (_key(pd.read_parquet(run / "joints.parquet")) for run in (full, searched))
    assert len(searched) < len(full)
    pd.testing.assert_frame_equal(searched, full.loc[searched.index])


def test_adaptive_search_refuses_what_it_cannot_search(tmp_path, single_thread):
    from test_engine import TinyDataset, tiny_model
    from occbench.engine import run_protocol
    model, data = tiny_model(), TinyDataset(1)
    kwargs = dict(batch_size=4, memory_format="contiguous", quiet=True)
    with pytest.raises(UserError, match="--search 'greedy': valid: exhaustive, adaptive"):
        run_protocol(model, data, "advocc40", tmp_path / "a", search="greedy", **kwargs)
    with pytest.raises(UserError, match="protocol 'occsens40' reports 'mean'"):
        run_protocol(model, data, "occsens40", tmp_path / "b", search="adaptive", **kwargs)
    with pytest.raises(UserError, match="--replay or --max-windows"):
        run_protocol(model, data, "advocc40", tmp_path / "c", search="adaptive", max_windows=5, **kwargs)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    run_protocol(model, data, "advocc40", tmp_path / "d", search="adaptive", protocol_overrides={"stride": 40},
                 **kwargs)
    with pytest.raises(UserError, match="search differs"):    # resuming it as an exhaustive run
        run_protocol(model, data, "advocc40", tmp_path / "d", protocol_overrides={"stride": 40}, **kwargs)


def test_cli_refuses_adaptive_search_on_a_mean_protocol_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import occbench.zoo
    from occbench.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad --search")

    monkeypatch.setattr(occbench.zoo, "load_model", no_load)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "-m", "pare-demo", "-p", "occsens40", "--search", "adaptive", "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "error: --search adaptive: protocol 'occsens40' reports 'mean'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

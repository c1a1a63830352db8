"""The adaptive worst-window search (occbench.search) on synthetic error surfaces with a known worst window:
smooth bumps, plateaus and ties (first index among equals, as the exhaustive argmax), two peaks, NaN windows,
many samples searched together."""
from __future__ import annotations

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

    searches = search_worst_windows([s.shape for s in surfaces], evaluate)
    assert [s.best_window for s in searches] == [exhaustive_worst(s) for s in surfaces]
    assert calls[0] == [49, 36, 36]                         # the coarse grids of all three in one call
    assert [sum(c[i] for c in calls) for i in range(3)] == [s.n_evaluated for s in searches]
    assert len(calls) == max(s.rounds for s in searches) and calls[-1].count(0) >= 1


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
    assert SearchParams().record() == {"search": "adaptive", "coarse_stride": 3, "top": 4, "radius": 1}

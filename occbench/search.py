"""Adaptive worst-window search on a sliding-window grid: the worst window of AdvOcc in a fraction of the forwards.

AdvOcc scores each sample at its worst window: the argmax over every grid position of the window's mean
visible-joint MPJPE (the first window among equals). Neighbouring windows overlap by 70-87% at stride 10, so
the error over positions is mostly smooth, and a coarse-to-fine search finds the same window after trying a
fraction of the positions:

1. a coarse grid: every ``coarse_stride``-th row and column (centred so the border cells are as close to a
   coarse cell as the middle ones);
2. then, round after round, the not yet evaluated windows within ``radius`` grid cells (Chebyshev distance)
   of the ``top`` best windows evaluated so far;
3. until the ``top`` best windows have no unevaluated neighbour left: each of them is then at least as bad
   as every window around it, and the best is a local maximum that beat every other candidate tried.

Windows are ranked as the exhaustive argmax ranks them: by score, then by the lower window index among equal
scores; a NaN score (no visible joint) ranks below every number. So on a plateau the search walks towards
the plateau's first index, and the answer equals the exhaustive one whenever the exhaustive worst window is
among the evaluated ones (it is then the best of them). It is not guaranteed to be: an isolated peak that no
coarse cell leads to is missed (``bench/bench_search.py`` measures how often on real models).

The search never draws anything itself: the caller evaluates the windows it asks for (a window index is the
protocol's row-major grid index, ``row * n_cols + col``), so the occluders are the protocol's own seeded draws
and a window evaluated by both searches has identical error. :func:`search_worst_windows` runs the searches
of many samples together, asking for all of their windows in each round so the forward batches stay full.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from occbench.errors import UserError

SEARCHES = ("exhaustive", "adaptive")


@dataclass(frozen=True)
class SearchParams:
    """How the adaptive search walks the grid (recorded in run.json)."""

    # defaults tuned by bench/bench_search.py (the error surface of textured windows is rough: each window
    # draws its own texture, so a lone window can beat its neighbours; radius 2 and 4 climbers catch most)
    coarse_stride: int = 3    # grid cells between coarse windows, per axis (1 = every window)
    top: int = 4              # best windows whose neighbourhoods are evaluated in each round
    radius: int = 2           # neighbourhood: windows within this many grid cells (Chebyshev distance)

    def __post_init__(self):
        for name in ("coarse_stride", "top", "radius"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"adaptive search {name} = {value!r}: must be an integer >= 1")

    def record(self) -> dict:
        return {"search": "adaptive", **asdict(self)}


def coarse_windows(n_rows: int, n_cols: int, stride: int) -> np.ndarray:
    """Row-major window indices of the coarse grid: every ``stride``-th row and column, centred."""
    rows = np.arange((n_rows - 1) % stride // 2, n_rows, stride)
    cols = np.arange((n_cols - 1) % stride // 2, n_cols, stride)
    return (rows[:, None] * n_cols + cols[None, :]).reshape(-1)


class AdaptiveSearch:
    """The search for one sample's worst window, as a state machine driven by its caller::

        search = AdaptiveSearch(20, 20)
        while not search.done:
            windows = search.next_windows()
            search.report(windows, evaluate(windows))
        search.best_window, search.best_score, search.n_evaluated

    :meth:`next_windows` asks for the windows of the current round (ascending indices, none asked twice);
    every one of them must be reported before the next round is asked for.
    """

    def __init__(self, n_rows: int, n_cols: int, params: SearchParams = SearchParams()):
        if n_rows < 1 or n_cols < 1:
            raise ValueError(f"grid {n_rows} x {n_cols}: needs at least one window")
        self.n_rows, self.n_cols, self.params = n_rows, n_cols, params
        self.scores = np.full(n_rows * n_cols, np.nan)        # score of each evaluated window
        self.evaluated = np.zeros(n_rows * n_cols, bool)
        self.rounds = 0
        self._pending = coarse_windows(n_rows, n_cols, params.coarse_stride)

    @property
    def done(self) -> bool:
        return len(self._pending) == 0

    @property
    def n_evaluated(self) -> int:
        return int(self.evaluated.sum())

    def next_windows(self) -> np.ndarray:
        """The windows to evaluate now (empty once the search is done)."""
        return self._pending.copy()

    def report(self, windows, scores) -> None:
        """Scores of the windows :meth:`next_windows` asked for (NaN: no visible joint)."""
        windows = np.asarray(windows, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        if windows.shape != scores.shape or not np.array_equal(np.sort(windows), self._pending):
            raise ValueError(f"report the {len(self._pending)} windows asked for, each once, with one score each")
        self.scores[windows] = scores
        self.evaluated[windows] = True
        self.rounds += 1
        self._pending = self._neighbours_of_best()

    def ranked(self) -> np.ndarray:
        """Evaluated windows, worst first: by score, then the lower index among equals (NaN last)."""
        windows = np.flatnonzero(self.evaluated)
        scores = np.nan_to_num(self.scores[windows], nan=-np.inf)
        return windows[np.lexsort((windows, -scores))]

    @property
    def best_window(self) -> int:
        """The worst window found so far (-1 before any is evaluated)."""
        ranked = self.ranked()
        return int(ranked[0]) if len(ranked) else -1

    @property
    def best_score(self) -> float:
        window = self.best_window
        return float(self.scores[window]) if window >= 0 else float("nan")

    def _neighbours_of_best(self) -> np.ndarray:
        r = self.params.radius
        offsets = np.arange(-r, r + 1)
        wanted = np.zeros(self.n_rows * self.n_cols, bool)
        for window in self.ranked()[:self.params.top]:
            row, col = divmod(int(window), self.n_cols)
            rows = np.clip(row + offsets, 0, self.n_rows - 1)
            cols = np.clip(col + offsets, 0, self.n_cols - 1)
            wanted[(rows[:, None] * self.n_cols + cols[None, :]).reshape(-1)] = True
        return np.flatnonzero(wanted & ~self.evaluated)


def search_worst_windows(grids: Sequence[tuple[int, int]],
                         evaluate: Callable[[list[np.ndarray]], Sequence[np.ndarray]],
                         params: SearchParams = SearchParams()) -> list[AdaptiveSearch]:
    """Search the worst window of many samples together; returns one finished :class:`AdaptiveSearch` each.

    grids: (n_rows, n_cols) of each sample's window grid. evaluate: called once per round with a list holding,
    for every sample, the window indices to evaluate (empty for a sample whose search is done); returns one
    score array per sample, in the same order (an empty one where nothing was asked).
    """
    searches = [AdaptiveSearch(rows, cols, params) for rows, cols in grids]
    while not all(s.done for s in searches):
        requests = [s.next_windows() for s in searches]
        scores = evaluate(requests)
        for search, windows, values in zip(searches, requests, scores, strict=True):
            if len(windows):
                search.report(windows, values)
    return searches

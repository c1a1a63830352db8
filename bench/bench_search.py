"""Adaptive vs exhaustive worst-window search on AdvOcc (issue 18): forwards per sample, the share of samples
whose adaptive worst window is the exhaustive one, and the worst-window MPJPE of the adaptive search relative
to the exhaustive one (per sample: mean and worst case; the dataset's pooled headline), and the CPU seconds of
each run (only for runs made by this call; reused ones print -).

For each model and protocol it runs the protocol twice through the engine, ``search="exhaustive"`` and
``search="adaptive"``, on the same samples with one thread; goal: >= 3x fewer forwards, the same worst window
on >= 95% of samples, the dataset's worst-window MPJPE within 1%. ``--sweep`` then replays the exhaustive
run's per-window scores through other search parameters (no forwards: a window's score is the same in both
searches), which is how the defaults were chosen.

    python bench/bench_search.py                                  # pare-demo: 16 demo samples (96 px);
                                                                  # PARE-R50 random weights: 2 samples (224 px)
    python bench/bench_search.py --demo-samples 32 --r50-samples 3 --work runs/bench-search --sweep
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

PROTOCOLS = ("advocc40", "advocc80")
SWEEP = ((3, 4, 2), (3, 2, 2), (3, 3, 2), (3, 6, 2), (3, 4, 1), (3, 8, 1), (4, 4, 2), (2, 4, 1))


def window_scores(run_dir: Path) -> dict:
    """sample_id -> (n_windows,) score of every window (mean visible MPJPE, NaN: none visible), from a run."""
    from occbench.scoring import window_scores as scores_of
    joints = pd.read_parquet(run_dir / "joints.parquet", columns=["sample_id", "window", "joint", "mpjpe", "visible"])
    joints = joints[joints["window"] >= 0].sort_values(["sample_id", "window", "joint"])
    out = {}
    for sample_id, rows in joints.groupby("sample_id", sort=False):
        out[sample_id] = scores_of(rows["mpjpe"].to_numpy(copy=True).reshape(-1, 14),
                                   rows["visible"].to_numpy(copy=True).reshape(-1, 14))
    return out


def compare(exhaustive: Path, adaptive: Path, cpu_seconds: dict) -> dict:
    """The figures of one (model, protocol): adaptive run against the exhaustive run."""
    ex = pd.read_parquet(exhaustive / "samples.parquet").set_index("sample_id")
    ad = pd.read_parquet(adaptive / "samples.parquet").set_index("sample_id").loc[ex.index]
    ratio = ad["worst_mpjpe"] / ex["worst_mpjpe"]
    headline = [json.loads((run / "metrics.json").read_text())["headline"]["mpjpe"] for run in (exhaustive, adaptive)]
    return {"samples": len(ex), "grid": int(ex["n_windows"].iloc[0]),
            "forwards": float(ad["n_windows"].mean()), "forwards_max": int(ad["n_windows"].max()),
            "fewer": float(ex["n_windows"].mean() / ad["n_windows"].mean()),
            "same": float((ad["worst_window"] == ex["worst_window"]).mean()),
            "ratio_mean": float(ratio.mean()), "ratio_min": float(ratio.min()),
            "dataset_ratio": headline[1] / headline[0],
            "cpu_s": [cpu_seconds.get(s) for s in ("exhaustive", "adaptive")]}


def sweep(exhaustive: Path, params_list) -> list[dict]:
    """The search replayed on the exhaustive run's per-window scores for each (coarse_stride, top, radius)."""
    from occbench.search import SearchParams, search_worst_windows
    scores = window_scores(exhaustive)
    ids = list(scores)
    n_axis = int(round(len(scores[ids[0]]) ** 0.5))
    truth = {i: int(np.argmax(np.nan_to_num(s, nan=-np.inf))) for i, s in scores.items()}
    rows = []
    for coarse_stride, top, radius in params_list:
        searches = search_worst_windows([(n_axis, n_axis)] * len(ids),
                                        lambda req: [scores[i][w] for i, w in zip(ids, req)],
                                        SearchParams(coarse_stride, top, radius))
        forwards = np.mean([s.n_evaluated for s in searches])
        found = [s.best_window for s in searches]
        ratio = np.array([scores[i][f] / scores[i][truth[i]] for i, f in zip(ids, found)])
        rows.append({"coarse_stride": coarse_stride, "top": top, "radius": radius, "forwards": forwards,
                     "fewer": n_axis * n_axis / forwards,
                     "same": float(np.mean([f == truth[i] for i, f in zip(ids, found)])),
                     "ratio_mean": float(ratio.mean()), "ratio_min": float(ratio.min())})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-samples", type=int, default=16, help="pare-demo samples (0: skip the model)")
    parser.add_argument("--r50-samples", type=int, default=2, help="PARE-R50 random-weight samples (0: skip)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS))
    parser.add_argument("--coarse-stride", type=int, default=None)
    parser.add_argument("--top", type=int, default=None)
    parser.add_argument("--radius", type=int, default=None)
    parser.add_argument("--work", default=None, help="Keep the run directories here (reruns resume them).")
    parser.add_argument("--sweep", action="store_true", help="Also replay the scores through other parameters.")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    from occbench.data import open_dataset
    from occbench.engine import run_protocol
    from occbench.search import SearchParams
    from occbench.zoo import load_model
    defaults = SearchParams()
    params = SearchParams(args.coarse_stride or defaults.coarse_stride, args.top or defaults.top,
                          args.radius or defaults.radius)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-search-"))
    dataset = open_dataset("demo")
    models = [("pare-demo", dict(name="pare-demo"), args.demo_samples, 32),
              ("pare-r50-random", dict(name="pare", weights="random", backbone="resnet50"), args.r50_samples, 16)]
    print(f"adaptive search {params.record()} vs exhaustive; one thread; run directories in {work}"
          + ("" if args.work else " (removed at the end; --work keeps them)"))
    header = (f"{'model':16s}{'protocol':10s}{'samples':>8s}{'forwards/sample':>22s}{'fewer':>7s}{'same worst':>11s}"
              f"{'worst MPJPE ratio mean / min':>30s}{'dataset':>9s}{'CPU s ex / ad':>17s}")
    results = []
    for label, spec, n_samples, batch_size in models:
        if n_samples <= 0:
            continue
        spec = dict(spec)
        model = load_model(spec.pop("name"), device="cpu", **spec)
        for protocol in args.protocols:
            runs, cpu_seconds = {}, {}
            for search in ("exhaustive", "adaptive"):
                out = work / f"{label}-{protocol}-{n_samples}-{search}"
                fresh, start = not out.exists(), time.process_time()
                runs[search] = run_protocol(model, dataset, protocol, out, seed=0, limit=n_samples,
                                            batch_size=batch_size, memory_format="contiguous", quiet=True,
                                            progress=False, search=search,
                                            search_params=params if search == "adaptive" else None)
                if fresh:   # CPU time of this process: on a shared machine wall time measures the neighbours
                    cpu_seconds[search] = time.process_time() - start
            results.append((label, protocol, runs, compare(runs["exhaustive"], runs["adaptive"], cpu_seconds)))
    print(header)
    for label, protocol, _, r in results:
        seconds = " / ".join(f"{c:.0f}" if c is not None else "-" for c in r["cpu_s"])
        print(f"{label:16s}{protocol:10s}{r['samples']:8d}{r['forwards']:>10.1f} of {r['grid']:3d} (max {r['forwards_max']:3d})"
              f"{r['fewer']:6.2f}x{100 * r['same']:10.1f}%{r['ratio_mean']:>20.4f} / {r['ratio_min']:.4f}"
              f"{r['dataset_ratio']:9.4f}{seconds:>17s}")
    missed = [f"{label} {protocol}" for label, protocol, _, r in results
              if not (r["fewer"] >= 3 and r["same"] >= 0.95 and abs(r["dataset_ratio"] - 1) <= 0.01)]
    print("goal (>= 3x fewer forwards, the same worst window on >= 95% of samples, dataset within 1%): "
          + (f"NOT met on {', '.join(missed)}" if missed else "met on every row"))
    sweeps = [(label, protocol, sweep(runs["exhaustive"], SWEEP)) for label, protocol, runs, _ in results] \
        if args.sweep else []
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if args.sweep:
        print("\nsweep: the exhaustive runs' window scores replayed through other parameters (no forwards)")
        print(f"{'model':16s}{'protocol':10s}{'stride top radius':>18s}{'forwards':>10s}{'fewer':>7s}{'same':>8s}"
              f"{'ratio mean / min':>20s}")
        for label, protocol, rows in sweeps:
            for row in rows:
                print(f"{label:16s}{protocol:10s}{row['coarse_stride']:>8d}{row['top']:>4d}{row['radius']:>6d}"
                      f"{row['forwards']:10.1f}{row['fewer']:6.2f}x{100 * row['same']:7.1f}%"
                      f"{row['ratio_mean']:>12.4f} / {row['ratio_min']:.4f}")


if __name__ == "__main__":
    main()

"""Run directories with known errors, written without a model through the engine's own run-directory code
(:mod:`occbench.rundir`: the same schemas, chunk files and final tables), for aggregation and report tests."""
import numpy as np
import pyarrow.parquet as pq

from occbench import rundir, windows

N_J = 14


def write_run(path, *, model="m", protocol=None, errors, visible=None, anchors=None, doc=None, pattern=None,
              conventions=None, worst=None, n_samples_config=None):
    """A run dir whose errors are given: errors[sample][window] = (14,) mpjpe; window -1 is clean.

    pa_mpjpe = mpjpe / 2 and pckh = (mpjpe < 100); no per-axis errors or PVE (NaN)."""
    protocol = protocol or {"name": "occsens40", "kind": "occsens", "report": "mean", "reduction": "per-sample",
                            "indexing": "top-left"}
    rows, samples = [], []
    for s, sample_windows in enumerate(errors):
        for w, err in sample_windows.items():
            table = windows.empty_table(1) if w >= 0 else windows.clean_table()
            ax, ay = (anchors or {}).get(w, (0.0, 0.0))
            table["window"][:] = w
            table["x0"][:], table["y0"][:], table["size"][:] = ax, ay, 40.0
            table["anchor_x"][:], table["anchor_y"][:] = ax, ay
            table["pattern"][:] = (pattern or {}).get(w, "")
            table["doc"][:] = (doc or {}).get(w, 0)
            vis = np.ones(N_J, bool) if visible is None else visible[s][w]
            rows.append((s, table, np.asarray(err, np.float64), np.asarray(vis, bool)))
        occl = [w for w in sample_windows if w >= 0]
        means = {w: np.mean(sample_windows[w]) for w in occl}
        samples.append({"sample_index": s, "sample_id": f"s{s}",
                        "mean_mpjpe": float(np.mean(list(means.values()))) if means else np.nan,
                        "worst_window": (worst[s] if worst else (max(means, key=means.get) if means else -1))})
    mpjpe = np.stack([r[2] for r in rows]).astype(np.float32)
    joints = rundir.joint_table(
        windows.concatenate([r[1] for r in rows]), np.array([r[0] for r in rows]),
        np.array([f"s{r[0]}" for r in rows], dtype=object), mpjpe=mpjpe, pa_mpjpe=mpjpe / 2,
        pckh=(mpjpe < 100).astype(np.float32), visible=np.stack([r[3] for r in rows]),
        occluded=np.zeros(mpjpe.shape, bool), in_crop=np.ones(mpjpe.shape, bool),
        axis_err=np.full(mpjpe.shape + (3,), np.nan, np.float32), pve=np.full(len(rows), np.nan, np.float32))
    config = {"model": {"name": model, "weights": "checkpoint"}, "protocol": protocol,
              "dataset": {"name": "demo"}, "conventions": conventions or {"pelvis": "h36m-root"},
              "n_samples": n_samples_config or len(errors)}
    run = rundir.RunDir.open_or_create(path, config)
    run.write_chunk(0, rundir.chunk_tables(joints, samples, []))
    run.concatenate([0])
    run.close()
    return path


def const(v):
    return np.full(N_J, float(v))


def write_predictions(path, n_samples, body=None):
    """predictions.parquet: every sample's clean prediction = the stand-in mean pose, seen from the front."""
    import torch
    from occbench.body import load_mean_params
    from occbench.rotations import rot6d_to_rotmat
    mean = load_mean_params()
    rotmat = rot6d_to_rotmat(torch.as_tensor(mean["pose"]).view(24, 6)).reshape(-1).numpy()
    table = rundir.prediction_table(range(n_samples), [f"s{s}" for s in range(n_samples)],
                                    np.tile(rotmat.astype(np.float32), (n_samples, 1)),
                                    np.zeros((n_samples, 10), np.float32),
                                    np.tile(np.array([0.9, 0.0, 0.0], np.float32), (n_samples, 1)))
    pq.write_table(table, rundir.table_path(path, "predictions"))

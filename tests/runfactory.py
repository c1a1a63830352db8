"""Run directories with known errors, written without the engine (for aggregation and report tests)."""
import json

import numpy as np
import pandas as pd

N_J = 14


def write_run(path, *, model="m", protocol=None, errors, visible=None, anchors=None, doc=None, pattern=None,
              conventions=None, worst=None, n_samples_config=None):
    """A run dir whose errors are given: errors[sample][window] = (14,) mpjpe; window -1 is clean."""
    protocol = protocol or {"name": "occsens40", "kind": "occsens", "report": "mean", "reduction": "per-sample",
                            "indexing": "top-left"}
    rows, samples = [], []
    for s, windows in enumerate(errors):
        for w, err in windows.items():
            vis = np.ones(N_J, bool) if visible is None else visible[s][w]
            ax, ay = (anchors or {}).get(w, (0.0, 0.0))
            for j in range(N_J):
                rows.append({"sample_index": s, "sample_id": f"s{s}", "window": w, "joint": j,
                             "mpjpe": float(err[j]), "pa_mpjpe": float(err[j]) / 2, "pckh": float(err[j] < 100),
                             "visible": bool(vis[j]), "occluded": False, "in_crop": True,
                             "x0": ax, "y0": ay, "size": 40.0, "anchor_x": ax, "anchor_y": ay,
                             "pattern": (pattern or {}).get(w, ""), "doc": (doc or {}).get(w, 0)})
        occl = [w for w in windows if w >= 0]
        means = {w: np.mean(windows[w]) for w in occl}
        samples.append({"sample_index": s, "sample_id": f"s{s}",
                        "mean_mpjpe": float(np.mean(list(means.values()))) if means else np.nan,
                        "worst_window": (worst[s] if worst else (max(means, key=means.get) if means else -1))})
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(path / "joints.parquet")
    pd.DataFrame(samples).to_parquet(path / "samples.parquet")
    config = {"model": {"name": model, "weights": "checkpoint"}, "protocol": protocol,
              "dataset": {"name": "demo"}, "conventions": conventions or {"pelvis": "h36m-root"},
              "n_samples": n_samples_config or len(errors)}
    (path / "run.json").write_text(json.dumps(config))
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
    rows = [{"sample_index": s, "rotmat": rotmat.tolist(), "betas": [0.0] * 10, "cam": [0.9, 0.0, 0.0]}
            for s in range(n_samples)]
    pd.DataFrame(rows).to_parquet(path / "predictions.parquet")

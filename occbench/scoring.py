"""Scoring: per-joint errors of predictions against references (through :mod:`occbench.metrics`), each
sample's summary (clean, mean and worst window), and the metrics.json aggregation of a run's chunks.

The reduction rules here (per-sample: mean over joints of each (sample, window), then over windows, then
over samples; pooled-visible: mean over every evaluated joint instance) are shared with
:mod:`occbench.results`, which adds bootstrap confidence intervals.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from occbench import metrics
from occbench.data.joints import LSP14_NAMES

N_JOINTS = len(LSP14_NAMES)


# ------------------------------------------------------------------------------------------ per batch
def joint_errors(pred3d, pred_root, pred2d, ref3d, ref2d, head, visible, pck_mask, pelvis: str,
                 threshold: float = 0.5):
    """Per-joint errors of one batch (all (B,14[,k]) tensors on one device).

    pred3d: predicted LSP joints, body frame; pred_root: H36M pelvis (B,3); ref3d: reference joints, already
    pelvis-aligned; visible: (B,14) joints Procrustes is fitted on; pck_mask: (B,14) joints PCKh scores.
    Returns numpy (mpjpe mm, pa_mpjpe mm, pckh 1/0/NaN) of shape (B,14) and the signed per-axis error
    (B,14,3) in mm after pelvis alignment (BoPR's axis-wise MJE): errors are given for every joint (the
    ``visible`` column of the run says which ones a protocol evaluates).
    """
    aligned = metrics.align_pelvis(pred3d, pelvis, pelvis=pred_root if pelvis == "h36m-root" else None)
    mpjpe = torch.linalg.vector_norm(aligned - ref3d, dim=-1) * metrics.MM_PER_M
    fit_mask = visible if bool((visible.sum(dim=1) >= 3).all()) else visible | (visible.sum(1, keepdim=True) < 3)
    pa_aligned = metrics.procrustes_align(aligned.double(), ref3d.double(), mask=fit_mask)
    pa = torch.linalg.vector_norm(pa_aligned - ref3d.double(), dim=-1) * metrics.MM_PER_M
    correct = metrics.pckh(pred2d, ref2d, head, mask=pck_mask, threshold=threshold)
    scorable = pck_mask & torch.isfinite(head)[:, None] & (head > 0)[:, None]
    pckh = torch.where(scorable, correct.float(), torch.full_like(correct, float("nan"), dtype=torch.float32))
    axis = ((aligned - ref3d) * metrics.MM_PER_M).float().cpu().numpy()
    return mpjpe.float().cpu().numpy(), pa.float().cpu().numpy(), pckh.cpu().numpy(), axis


def vertex_errors(pred, root, joints, gt_verts, slots, pelvis: str) -> np.ndarray:
    """(B,) PVE in mm of a batch: predicted vertices minus the predicted pelvis (same convention as the joints)
    against the GT vertices; NaN without GT vertices (PARE's PVE: no other alignment)."""
    if gt_verts is None or pred.vertices is None:    # no mesh: a joints-only outside model
        return np.full(len(slots), np.nan, np.float32)
    origin = root if pelvis == "h36m-root" else joints[:, 2:4].mean(1)
    verts = pred.vertices.float() - origin[:, None, :]
    err = torch.linalg.vector_norm(verts - gt_verts[torch.as_tensor(np.asarray(slots), device=verts.device)], dim=-1)
    return (err.mean(-1) * 1000.0).cpu().numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------ per sample
def _masked_mean(values, mask):
    count = mask.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(mask, values, 0).sum(-1) / np.maximum(count, 1), np.nan)


def sample_summary(index: int, sample_id: str, table: dict, rows, mpjpe, pa_err, pck, visible,
                   texture_names=None) -> dict:
    """One row of samples.parquet: the sample's clean errors, its mean over windows and its worst window
    (the highest mean visible MPJPE; the first among equals). ``rows`` selects the sample's rows (clean copy
    and windows) of the chunk's window table and error arrays; texture_names: the texture bank's names."""
    window = table["window"][rows]
    m, p, k, v = mpjpe[rows], pa_err[rows], pck[rows], visible[rows]
    per_m, per_p = _masked_mean(m, v), _masked_mean(p, v)
    k_mask = v & np.isfinite(k)
    per_k = _masked_mean(np.nan_to_num(k), k_mask)
    clean, occl = window < 0, window >= 0
    row = {"sample_index": index, "sample_id": sample_id, "n_windows": int(occl.sum()),
           "clean_mpjpe": per_m[clean][0], "clean_pa_mpjpe": per_p[clean][0], "clean_pckh": per_k[clean][0]}
    if occl.any():
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            row.update(mean_mpjpe=np.nanmean(per_m[occl]), mean_pa_mpjpe=np.nanmean(per_p[occl]),
                       mean_pckh=np.nanmean(per_k[occl]))
        scores = np.where(np.isfinite(per_m[occl]), per_m[occl], -np.inf)
        worst_local = int(np.argmax(scores))          # first window among equals, as numpy's argmax
        worst = np.flatnonzero(rows)[np.flatnonzero(occl)[worst_local]]
        texture = int(table["texture"][worst])
        row.update(worst_window=int(table["window"][worst]), worst_mpjpe=per_m[occl][worst_local],
                   worst_pa_mpjpe=per_p[occl][worst_local], worst_pckh=per_k[occl][worst_local],
                   worst_n_visible=int(visible[worst].sum()),
                   worst_texture=(texture_names[texture] if texture >= 0 and texture_names else ""),
                   worst_tex_x=int(table["tex_x"][worst]), worst_tex_y=int(table["tex_y"][worst]),
                   worst_x0=float(table["x0"][worst]), worst_y0=float(table["y0"][worst]),
                   worst_size=float(table["size"][worst]), worst_pattern=str(table["pattern"][worst]),
                   worst_doc=int(table["doc"][worst]), worst_target_joint=int(table["target_joint"][worst]))
    else:
        row.update(mean_mpjpe=np.nan, mean_pa_mpjpe=np.nan, mean_pckh=np.nan, worst_window=-1,
                   worst_mpjpe=np.nan, worst_pa_mpjpe=np.nan, worst_pckh=np.nan, worst_n_visible=0,
                   worst_texture="", worst_tex_x=0, worst_tex_y=0, worst_x0=np.nan, worst_y0=np.nan,
                   worst_size=np.nan, worst_pattern="", worst_doc=0, worst_target_joint=-1)
    return row


# ------------------------------------------------------------------------------------------ shared rules
def reported_source(protocol: dict) -> str:
    """Which windows a protocol reports: clean, occluded (every window) or worst (each sample's worst)."""
    if protocol["kind"] == "clean":
        return "clean"
    return "worst" if protocol.get("report") == "worst" else "occluded"


def worst_rows(joints, samples) -> np.ndarray:
    """(len(joints),) bool: the rows of each sample's worst window (samples.parquet ``worst_window``)."""
    worst = dict(zip(samples["sample_index"], samples["worst_window"]))
    return joints["window"].to_numpy() == joints["sample_index"].map(worst).to_numpy()


def per_sample_means(rows, metric: str):
    """The per-sample reduction of ``metric`` (a pandas Series indexed by sample_index): mean over joints of
    each (sample, window), then over the sample's windows."""
    per_window = rows.groupby(["sample_index", "window"])[metric].mean()
    return per_window.groupby(level=0).mean()


# ------------------------------------------------------------------------------------------ metrics.json
def summarize(run, chunks: list[int]) -> dict:
    """metrics.json from the chunk files of ``run`` (a :class:`occbench.rundir.RunDir`), one chunk in memory
    at a time.

    - ``clean``: the clean copies; ``occluded``: every window; ``worst``: each sample's worst window.
      Each has mpjpe / pa_mpjpe under both reductions (per-sample and pooled over evaluated joints) and PCKh
      (per joint over its scored instances, then the mean over joints).
    - ``per_joint``: mean MPJPE per joint over every window (evaluated instances).
    - ``by_pattern_doc``: MPJPE per (pattern, DoC) for HKMR protocols (per-sample reduction).
    - ``headline``: the protocol's own numbers (its ``report`` and ``reduction``).
    """
    protocol = run.config["protocol"]
    acc = {name: _Acc() for name in ("clean", "occluded", "worst")}
    groups: dict = {}
    per_joint = np.zeros((2, N_JOINTS))
    n_samples = n_failed = 0
    for chunk in chunks:
        joints = run.read_chunk(chunk, "joints").to_pandas()
        samples = run.read_chunk(chunk, "samples").to_pandas()
        n_failed += run.read_chunk(chunk, "failed").num_rows
        n_samples += len(samples)
        if joints.empty:
            continue
        is_clean = joints["window"].to_numpy() < 0
        is_worst = worst_rows(joints, samples)
        acc["clean"].add(joints[is_clean])
        acc["occluded"].add(joints[~is_clean])
        acc["worst"].add(joints[~is_clean & is_worst])
        occl = joints[~is_clean & joints["visible"]]
        np.add.at(per_joint[0], occl["joint"].to_numpy(), occl["mpjpe"].to_numpy())
        np.add.at(per_joint[1], occl["joint"].to_numpy(), 1)
        if protocol["kind"] == "hkmr":
            for (pattern, doc), part in joints[~is_clean].groupby(["pattern", "doc"]):
                groups.setdefault((pattern, int(doc)), _Acc()).add(part)
    out = {"n_samples": n_samples, "n_failed": n_failed}
    for name, a in acc.items():
        out[name] = a.result()
    with np.errstate(invalid="ignore", divide="ignore"):
        out["per_joint"] = {n: _num(v) for n, v in zip(LSP14_NAMES, per_joint[0] / per_joint[1])}
    if groups:
        out["by_pattern_doc"] = [{"pattern": p, "doc": d, **a.result()} for (p, d), a in sorted(groups.items())]
    reduction = protocol["reduction"]
    source = reported_source(protocol)
    picked = out[source]
    out["headline"] = {"source": source, "reduction": reduction, "mpjpe": picked["mpjpe"][reduction],
                       "pa_mpjpe": picked["pa_mpjpe"][reduction], "pckh": picked["pckh"],
                       "clean_mpjpe": out["clean"]["mpjpe"]["per-sample"]}
    return out


def _num(value):
    value = float(value)
    return None if not math.isfinite(value) else round(value, 4)


class _Acc:
    """Streaming sums for per-sample and pooled means and per-joint PCKh."""

    def __init__(self):
        self.sample_sums = {"mpjpe": 0.0, "pa_mpjpe": 0.0}
        self.n_sample = 0
        self.pooled = {"mpjpe": 0.0, "pa_mpjpe": 0.0}
        self.n_pooled = 0
        self.pck = np.zeros((2, N_JOINTS))

    def add(self, rows):
        rows = rows[rows["visible"]]
        if rows.empty:
            return
        for name in ("mpjpe", "pa_mpjpe"):
            self.pooled[name] += float(rows[name].astype(np.float64).sum())
            self.sample_sums[name] += float(per_sample_means(rows, name).astype(np.float64).sum())
        self.n_sample += int(rows["sample_index"].nunique())
        self.n_pooled += len(rows)
        scored = rows[np.isfinite(rows["pckh"].to_numpy())]
        np.add.at(self.pck[0], scored["joint"].to_numpy(), scored["pckh"].to_numpy())
        np.add.at(self.pck[1], scored["joint"].to_numpy(), 1)

    def result(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            per_joint = self.pck[0] / self.pck[1]
            res = {name: {"per-sample": _num(self.sample_sums[name] / self.n_sample) if self.n_sample else None,
                          "pooled-visible": _num(self.pooled[name] / self.n_pooled) if self.n_pooled else None}
                   for name in ("mpjpe", "pa_mpjpe")}
        finite = per_joint[np.isfinite(per_joint)]
        res["pckh"] = _num(100.0 * finite.mean()) if len(finite) else None
        res["n_joint_instances"] = self.n_pooled
        return res


def format_summary(config: dict, metrics: dict) -> str:
    """The table printed at the end of a run."""
    p = config["protocol"]
    lines = [f"{config['model']['name']} | {p['name']} | {config['dataset']['name']} | "
             f"{metrics['n_samples']} samples, {metrics['n_failed']} failed | seed {config['seed']} | "
             f"{config['precision']}, batch {config['batch_size']}"]
    if not config.get("comparable", True):
        lines.append("note: not comparable to published numbers (random weights, stand-in body or "
                     "fallback textures; see run.json)")
    red = p["reduction"]
    lines.append(f"{'':18s}{'MPJPE':>10s}{'PA-MPJPE':>10s}{'PCKh@' + str(p['pckh_threshold']):>10s}"
                 f"{'joints':>9s}   ({red})")
    for name, label in (("clean", "clean"), ("occluded", "all windows"), ("worst", "worst window")):
        r = metrics[name]
        if p["kind"] == "clean" and name != "clean":
            continue
        fmt = lambda v: f"{v:10.1f}" if v is not None else f"{'-':>10s}"
        lines.append(f"{label:18s}{fmt(r['mpjpe'][red])}{fmt(r['pa_mpjpe'][red])}{fmt(r['pckh'])}"
                     f"{r['n_joint_instances']:9d}")
    for g in metrics.get("by_pattern_doc", []):
        lines.append(f"  {g['pattern']:>6s} DoC {g['doc']}: MPJPE {g['mpjpe']['per-sample'] or float('nan'):7.1f}"
                     f"  PA-MPJPE {g['pa_mpjpe']['per-sample'] or float('nan'):7.1f}")
    return "\n".join(lines)


"""Scoring: per-joint errors, each sample's summary and the metrics.json aggregation of a run.

Per-joint errors of predictions against references go through :mod:`occbench.metrics`; a sample's summary
holds its clean errors, the mean over windows and its worst window.

The reduction rules here (per-sample: mean over joints of each (sample, window), then over windows, then
over samples; pooled-visible: mean over every evaluated joint instance) are shared with
:mod:`occbench.results`, which adds bootstrap confidence intervals.
"""
from __future__ import annotations

import math

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
    mpjpe = metrics.mpjpe(aligned, ref3d)
    # every joint is transformed by the fit on the evaluated ones (the ``visible`` column says which count);
    # a row with fewer than metrics.MIN_PA_JOINTS of them has no fit: NaN (metrics.pa_mask leaves it out)
    pa_aligned = metrics.procrustes_align(aligned.double(), ref3d.double(), mask=visible)
    pa = metrics.mpjpe(pa_aligned, ref3d.double())
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
def _row_means(values, mask) -> np.ndarray:
    return metrics.row_means(torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(mask)).numpy()


def _sample_mean(values, mask) -> float:
    """The per-sample reduction of one sample's rows (NaN when no row has an evaluated joint)."""
    _, num, _ = metrics.sample_terms(torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(mask),
                                     torch.zeros(len(values), dtype=torch.long), "per-sample")
    return float(num[0]) if len(num) else float("nan")


def window_scores(mpjpe, visible) -> np.ndarray:
    """(n,) the score a worst window is chosen by: each window's mean MPJPE over its visible joints (NaN where
    none is visible). mpjpe, visible: (n,14) rows of windows."""
    return _row_means(mpjpe, visible)


def sample_summary(index: int, sample_id: str, table: dict, rows, mpjpe, pa_err, pck, visible,
                   texture_names=None) -> dict:
    """One row of samples.parquet: the sample's clean errors, its mean over windows and its worst window
    (the highest mean visible MPJPE; the first among equals). ``rows`` selects the sample's rows (clean copy
    and windows) of the chunk's window table and error arrays; texture_names: the texture bank's names."""
    window = table["window"][rows]
    m, p, k, v = mpjpe[rows], pa_err[rows], pck[rows], visible[rows]
    per_m = window_scores(m, v)
    per_p = _row_means(p, metrics.pa_mask(torch.from_numpy(v)).numpy())
    per_k = _row_means(np.nan_to_num(k), v & np.isfinite(k))
    clean, occl = window < 0, window >= 0
    row = {"sample_index": index, "sample_id": sample_id, "n_windows": int(occl.sum()),
           "clean_mpjpe": per_m[clean][0], "clean_pa_mpjpe": per_p[clean][0], "clean_pckh": per_k[clean][0]}
    if occl.any():
        row.update(mean_mpjpe=_sample_mean(m[occl], v[occl]),
                   mean_pa_mpjpe=_sample_mean(p[occl], metrics.pa_mask(torch.from_numpy(v[occl])).numpy()),
                   mean_pckh=_sample_mean(np.nan_to_num(k[occl]), (v & np.isfinite(k))[occl]))
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


def error_matrices(rows) -> dict:
    """Rows of a joints table (whole (sample, window) blocks of 14 joints, in the order rundir writes them)
    as arrays: ``sample_index``, ``window`` (R,) and every per-joint column as (R,14)."""
    n = len(rows)
    joint = rows["joint"].to_numpy()
    if n % N_JOINTS or not (joint.reshape(-1, N_JOINTS) == np.arange(N_JOINTS)).all():
        raise ValueError("joints rows must come in whole (sample, window) blocks of 14 joints in order")
    # copies: arrays from arrow tables are read-only, and torch.from_numpy wants writable memory
    out = {"sample_index": np.array(rows["sample_index"].to_numpy()[::N_JOINTS]),
           "window": np.array(rows["window"].to_numpy()[::N_JOINTS])}
    for name in ("mpjpe", "pa_mpjpe", "pckh", "visible", "err_x", "err_y", "err_z", "pve"):
        if name in rows:
            out[name] = np.array(rows[name].to_numpy()).reshape(-1, N_JOINTS)
    return out


def metric_rows(matrices: dict, metric: str):
    """(errors (R,J), evaluated mask (R,J)) of ``metric`` for :func:`occbench.metrics.sample_terms`.

    MPJPE and the per-axis errors (absolute values, BoPR's MJE) count the visible joints; PA-MPJPE the
    visible joints of rows that can be aligned (:func:`occbench.metrics.pa_mask`); PVE is one value per
    row (a (R,1) column, counted where the run has GT vertices)."""
    visible = matrices["visible"].astype(bool)
    if metric == "pa_mpjpe":
        return matrices[metric], metrics.pa_mask(torch.from_numpy(visible)).numpy()
    if metric == "pve":
        values = matrices["pve"][:, :1]
        return values, np.isfinite(values)
    if metric in ("err_x", "err_y", "err_z"):
        return np.abs(matrices[metric]), visible
    return matrices[metric], visible


def sample_terms(matrices: dict, metric: str, reduction: str, group=None):
    """(groups, num, den) of ``metric`` over the rows of ``matrices`` (:func:`error_matrices`), through
    :func:`occbench.metrics.sample_terms`; ``group`` (R,) replaces the sample index as the grouping key
    (e.g. the window, for heatmaps). The estimate is num.sum() / den.sum()."""
    values, mask = metric_rows(matrices, metric)
    key = matrices["sample_index"] if group is None else group
    groups, num, den = metrics.sample_terms(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)),
                                            torch.from_numpy(np.ascontiguousarray(mask)),
                                            torch.from_numpy(np.array(key, dtype=np.int64)), reduction)
    return groups.numpy(), num.numpy(), den.numpy()


def pckh_counts(matrices: dict):
    """(samples, hits (S,14), scored (S,14)) of the PCKh column (NaN = not scored) on visible joints."""
    samples, hits, totals = metrics.pckh_counts(torch.from_numpy(matrices["pckh"].astype(np.float64)),
                                                torch.from_numpy(matrices["visible"].astype(bool)),
                                                torch.from_numpy(matrices["sample_index"].astype(np.int64)))
    return samples.numpy(), hits.numpy(), totals.numpy()


# ------------------------------------------------------------------------------------------ metrics.json
def summarize(run, chunks: list[int]) -> dict:
    """metrics.json from the chunk files of ``run`` (a :class:`occbench.rundir.RunDir`), one chunk in memory
    at a time. Every number is a sum of :func:`occbench.metrics.sample_terms` over chunks (samples never span
    chunks), so it equals the results' estimate on the concatenated tables.

    - ``clean``: the clean copies; ``occluded``: every window; ``worst``: each sample's worst window.
      Each has mpjpe / pa_mpjpe under both reductions (per-sample and pooled over evaluated joints), PCKh
      (per joint over its scored instances, then the mean over joints), the count of evaluated joint
      instances and of rows without PA-MPJPE (fewer than 3 evaluated joints).
    - ``per_joint``: mean MPJPE per joint over every window (evaluated instances).
    - ``by_pattern_doc``: MPJPE per (pattern, DoC) for HKMR protocols (per-sample reduction).
    - ``headline``: the protocol's own numbers (its ``report`` and ``reduction``).
    Values are stored unrounded.
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
        if (~is_clean).any():
            occl = error_matrices(joints[~is_clean])
            for j in range(N_JOINTS):
                _, num, den = metrics.sample_terms(torch.from_numpy(occl["mpjpe"][:, j:j + 1].astype(np.float64)),
                                                   torch.from_numpy(occl["visible"][:, j:j + 1]),
                                                   reduction="pooled-visible")
                per_joint[:, j] += (float(num.sum()), float(den.sum()))
        if protocol["kind"] == "hkmr":
            for (pattern, doc), part in joints[~is_clean].groupby(["pattern", "doc"], sort=False):
                groups.setdefault((pattern, int(doc)), _Acc()).add(part.sort_index())
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
    return None if not math.isfinite(value) else value


class _Acc:
    """Sums of :func:`sample_terms` (both reductions) and PCKh counts over chunks."""

    def __init__(self):
        self.sums = {(m, r): np.zeros(2) for m in ("mpjpe", "pa_mpjpe") for r in metrics.REDUCTIONS}
        self.pck = np.zeros((2, N_JOINTS))
        self.n_pooled = 0
        self.n_pa_undefined = 0

    def add(self, rows):
        if rows.empty:
            return
        matrices = error_matrices(rows)
        for (metric, reduction), total in self.sums.items():
            _, num, den = sample_terms(matrices, metric, reduction)
            total += (num.sum(), den.sum())
        visible = matrices["visible"].astype(bool)
        self.n_pooled += int(visible.sum())
        count = visible.sum(axis=1)
        self.n_pa_undefined += int(((count > 0) & (count < metrics.MIN_PA_JOINTS)).sum())
        _, hits, totals = pckh_counts(matrices)
        self.pck += (hits.sum(axis=0), totals.sum(axis=0))

    def result(self):
        res = {}
        for metric in ("mpjpe", "pa_mpjpe"):
            res[metric] = {}
            for reduction in metrics.REDUCTIONS:
                num, den = self.sums[(metric, reduction)]
                res[metric][reduction] = _num(num / den) if den > 0 else None
        mean, _ = metrics.pckh_from_counts(torch.from_numpy(self.pck[0]), torch.from_numpy(self.pck[1]))
        res["pckh"] = _num(100.0 * float(mean))
        res["n_joint_instances"] = self.n_pooled
        res["n_rows_without_pa_mpjpe"] = self.n_pa_undefined
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
    if config.get("search"):
        s = config["search"]
        cost = config.get("search_cost") or {}
        lines.append(f"search: adaptive (coarse stride {s['coarse_stride']}, top {s['top']}, radius {s['radius']}): "
                     f"{cost.get('windows_per_sample', '?')} of {cost.get('grid_windows_per_sample', '?')} "
                     "windows per sample evaluated")
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


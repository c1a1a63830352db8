"""The protocol engine: every protocol is (dataset x windows) -> occluded batches on the model's device ->
per-joint errors streamed to a run directory.

For each chunk of samples the engine

1. loads the samples (a background thread prepares the next chunk while the model runs),
2. moves the clean crops to the model's device once, resized to the model's input size
   (bilinear, as :meth:`ZooModel.preprocess` would), and predicts the clean copies,
3. builds every sample's window table (:meth:`Protocol.windows`) and runs the windows in batches that may
   span samples: each batch of occluded crops is composed on the device with one tensor expression
   (:func:`occbench.occluders.compose`), so there is no per-window host round trip and no pixel loop,
4. computes per-joint MPJPE, PA-MPJPE (Procrustes fitted on the evaluated joints) and PCKh for every window,
   and writes the chunk atomically (:mod:`occbench.rundir`).

Why occluders are drawn at the model's input size: REFERENCE.md 1 scales all geometry by input_size / 224
(rounded), which is how 3DNBF draws its patches (57 px at 320, integer edges); drawing at 224 and resizing
would blur the patch edges and make it 57.14 px.

Inference runs under ``torch.inference_mode`` in channels-last or contiguous memory format with optional
autocast (``precision`` bf16 / fp16: the regressor runs in low precision, the body model in fp32). The batch
size and memory format are measured (:func:`autotune`), not assumed, unless given.
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from occbench import occluders as occ
from occbench.errors import UserError
from occbench.protocol import N_JOINTS, TABLE_COLUMNS, Protocol, clean_table, load_protocol
from occbench.rundir import RunDir, Shard, copy_chunks, plan_chunks, write_json

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
JOINT_NAMES = ("right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "right_wrist",
               "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist", "neck", "head_top")


# ------------------------------------------------------------------------------------------ forward
@dataclass
class Runner:
    """Runs a zoo model on batches of RGB [0,1] crops at its input size; returns fp32 joints.

    The fast path calls ``regress`` under autocast and the body model in fp32. A model that overrides
    ``predict`` (test-time fitting) is called through ``predict``; if it sets ``needs_grad = True`` the engine
    uses ``torch.no_grad`` instead of ``inference_mode`` so the model may enable gradients inside.
    """

    model: torch.nn.Module
    precision: str = "fp32"
    memory_format: str = "contiguous"
    forward_seconds: float = 0.0      # host time inside forward calls (exact on CPU; launch time on CUDA)
    last: object = None               # the last call's Prediction (params and vertices for PVE / predictions)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r}: valid: {', '.join(PRECISIONS)}")
        self.set_memory_format(self.memory_format)

    def set_memory_format(self, name: str) -> None:
        if name not in MEMORY_FORMATS:
            raise UserError(f"--memory-format {name!r}: valid: auto, {', '.join(MEMORY_FORMATS)}")
        self.memory_format = name
        self.model.to(memory_format=MEMORY_FORMATS[name])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def grad_context(self):
        return torch.no_grad() if getattr(self.model, "needs_grad", False) else torch.inference_mode()

    def __call__(self, images: torch.Tensor):
        """images: (B,3,S,S) RGB [0,1] at the model's input size -> (joints_lsp (B,14,3), joints_h36m root
        (B,3), joints2d (B,14,2)) fp32, body frame (pelvis not subtracted)."""
        from occbench.models.base import ZooModel
        start = time.perf_counter()
        try:
            return self._forward(images, ZooModel)
        finally:
            self.forward_seconds += time.perf_counter() - start

    def _forward(self, images, ZooModel):
        model = self.model
        dtype = PRECISIONS[self.precision]
        images = images.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])
        autocast = (torch.autocast(device_type=images.device.type, dtype=dtype) if dtype is not None
                    else _nullcontext())
        if type(model).predict is ZooModel.predict:
            with autocast:
                rotmat, betas, cam, _ = model.regress(model.preprocess(images))
            pred = model.prediction_from_params(rotmat.float(), betas.float(), cam.float(), {})
        else:
            with autocast:
                pred = model.predict(images)
        self.last = pred
        return pred.joints_lsp.float(), pred.joints_h36m[:, 0].float(), pred.joints2d.float()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def autotune(runner: Runner, input_size: int, max_batch: int = 64, memory_formats=None,
             min_seconds: float = 0.25, max_call_seconds: float = 2.0, rounds: int = 2,
             tolerance: float = 0.9) -> dict:
    """Measure images/s at batch sizes 1, 2, 4, ... (and each memory format); pick a fast one.

    Each size is timed in ``rounds`` separate rounds and keeps its best, so one slow moment on a shared
    machine does not decide. The batch stops growing after two sizes in a row below 85% of the best so far,
    once one call takes longer than ``max_call_seconds`` (slow CPUs: bigger batches no longer amortize
    anything), or when the device runs out of memory. The choice is the largest batch within ``tolerance``
    of the fastest: under load, a small batch that happened to be timed in a quiet moment loses more than it
    wins. Returns {"batch_size", "memory_format", "measurements": [{batch, format, images_per_s}, ...]}.
    """
    device = runner.device
    formats = memory_formats or (["channels_last", "contiguous"])
    results = []
    generator = torch.Generator().manual_seed(0)
    for fmt in formats:
        runner.set_memory_format(fmt)
        best, below = 0.0, 0
        batch = 1
        while batch <= max_batch:
            images = torch.rand(batch, 3, input_size, input_size, generator=generator).to(device)
            try:
                speed, per_call = _time_batch(runner, images, device, min_seconds, rounds)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            results.append({"batch": batch, "format": fmt, "images_per_s": round(speed, 2)})
            below = below + 1 if speed < 0.85 * best else 0
            if below >= 2:
                break
            best = max(best, speed)
            if per_call > max_call_seconds and batch >= 8:
                break   # a call this long already amortizes per-call overhead
            batch *= 2
    fastest = max(r["images_per_s"] for r in results)
    choice = max((r for r in results if r["images_per_s"] >= tolerance * fastest),
                 key=lambda r: (r["batch"], r["images_per_s"]))
    runner.set_memory_format(choice["format"])
    return {"batch_size": choice["batch"], "memory_format": choice["format"], "measurements": results}


def _time_batch(runner: Runner, images: torch.Tensor, device, min_seconds: float, rounds: int):
    """(best images/s over ``rounds`` timing rounds, seconds per call in that round)."""
    best_speed, best_call = 0.0, 0.0
    with runner.grad_context():
        runner(images)                      # warm-up (allocations, kernel selection)
        _sync(device)
        for _ in range(max(1, rounds)):
            calls, start = 0, time.perf_counter()
            while True:
                runner(images)
                calls += 1
                _sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds or calls >= 5:
                    break
            speed = len(images) * calls / elapsed
            if speed > best_speed:
                best_speed, best_call = speed, elapsed / calls
    return best_speed, best_call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ errors
def joint_errors(pred3d, pred_root, pred2d, ref3d, ref2d, head, visible, pck_mask, pelvis: str,
                 threshold: float = 0.5):
    """Per-joint errors of one batch (all (B,14[,k]) tensors on one device).

    pred3d: predicted LSP joints, body frame; pred_root: H36M pelvis (B,3); ref3d: reference joints, already
    pelvis-aligned; visible: (B,14) joints Procrustes is fitted on; pck_mask: (B,14) joints PCKh scores.
    Returns numpy (mpjpe mm, pa_mpjpe mm, pckh 1/0/NaN) of shape (B,14) and the signed per-axis error
    (B,14,3) in mm after pelvis alignment (BoPR's axis-wise MJE): errors are given for every joint (the
    ``visible`` column of the run says which ones a protocol evaluates).
    """
    from occbench import metrics
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


# ------------------------------------------------------------------------------------------ the run
@dataclass
class _Context:
    protocol: Protocol
    runner: Runner
    input_size: int
    seed: int
    batch_size: int
    pelvis: str
    textures: occ.TextureBank | None
    voc: object | None
    only: dict | None = None          # replay: sample_id -> [window]
    max_windows: int | None = None    # only each sample's first N windows (quick looks, benchmarks)
    stats: dict = field(default_factory=lambda: {"samples": 0, "windows": 0})


JOINT_SCHEMA = pa.schema(
    [("sample_index", pa.int64()), ("sample_id", pa.string()), ("window", pa.int32()), ("joint", pa.int8()),
     ("mpjpe", pa.float32()), ("pa_mpjpe", pa.float32()), ("pckh", pa.float32()), ("visible", pa.bool_()),
     ("occluded", pa.bool_()), ("in_crop", pa.bool_()), ("err_x", pa.float32()), ("err_y", pa.float32()),
     ("err_z", pa.float32()), ("pve", pa.float32())]
    + [(name, pa.string() if dtype is object else (pa.float64() if dtype is np.float64 else pa.int64()))
       for name, dtype in TABLE_COLUMNS.items() if name != "window"])
SUMMARY_FIELDS = [
    ("sample_index", pa.int64()), ("sample_id", pa.string()), ("n_windows", pa.int32()),
    ("clean_mpjpe", pa.float64()), ("clean_pa_mpjpe", pa.float64()), ("clean_pckh", pa.float64()),
    ("mean_mpjpe", pa.float64()), ("mean_pa_mpjpe", pa.float64()), ("mean_pckh", pa.float64()),
    ("worst_window", pa.int32()), ("worst_mpjpe", pa.float64()), ("worst_pa_mpjpe", pa.float64()),
    ("worst_pckh", pa.float64()), ("worst_n_visible", pa.int32()), ("worst_texture", pa.string()),
    ("worst_tex_x", pa.int64()), ("worst_tex_y", pa.int64()), ("worst_x0", pa.float64()),
    ("worst_y0", pa.float64()), ("worst_size", pa.float64()), ("worst_pattern", pa.string()),
    ("worst_doc", pa.int64()), ("worst_target_joint", pa.int64())]
SUMMARY_SCHEMA = pa.schema(SUMMARY_FIELDS)
FAILED_SCHEMA = pa.schema([("sample_index", pa.int64()), ("sample_id", pa.string()), ("reason", pa.string())])
# the clean prediction of every sample (sensitivity meshes are drawn on it): rotmat (216), betas (10), cam (3)
PREDICTION_SCHEMA = pa.schema([("sample_index", pa.int64()), ("sample_id", pa.string()),
                               ("rotmat", pa.list_(pa.float32())), ("betas", pa.list_(pa.float32())),
                               ("cam", pa.list_(pa.float32()))])


def _load_samples(dataset, start: int, end: int):
    loaded, failed = [], []
    ids = getattr(dataset, "sample_ids", None)
    for index in range(start, end):
        try:
            loaded.append((index, dataset[index]))
        except Exception as err:  # an unreadable sample must not stop the run; the reason is recorded
            sample_id = str(ids[index]) if ids is not None else f"#{index}"
            failed.append((index, sample_id, f"{type(err).__name__}: {err}"))
    return loaded, failed


def _prepare(ctx: _Context, index: int, sample):
    """Validated reference arrays + window table of one sample; raises UserError with the reason."""
    crop = np.asarray(sample.crop)
    if crop.shape != (224, 224, 3) or crop.dtype != np.uint8:
        raise UserError(f"crop must be (224,224,3) uint8, got {crop.shape} {crop.dtype}")
    if ctx.protocol.reference == "gt":
        if sample.joints3d is None:
            raise UserError("no 3D ground truth (use reference = 'clean', the GT-free mode)")
        joints3d = np.asarray(sample.joints3d, dtype=np.float32)
        if joints3d.shape != (N_JOINTS, 3):
            raise UserError(f"joints3d must be (14,3), got {joints3d.shape}")
    joints2d = None if sample.joints2d is None else np.asarray(sample.joints2d, dtype=np.float64)
    valid2d = (np.ones(N_JOINTS, bool) if sample.joints2d_valid is None
               else np.asarray(sample.joints2d_valid, bool))
    if joints2d is None:
        valid2d = np.zeros(N_JOINTS, bool)
    only = None
    if ctx.only is not None:
        if sample.sample_id not in ctx.only:
            raise UserError("not in the replayed run (or it failed there)")
        only = ctx.only[sample.sample_id]
    if ctx.protocol.kind == "voc":
        table = ctx.voc.windows(ctx.protocol, sample.sample_id, ctx.seed, ctx.input_size)
        if only is not None:
            keep = np.isin(table["window"], only)
            table = {k: v[keep] for k, v in table.items()}
    else:
        table = ctx.protocol.windows(sample.sample_id, ctx.input_size, ctx.seed, joints2d=joints2d,
                                     joints2d_valid=valid2d, textures=ctx.textures, only=only)
    if ctx.max_windows is not None:
        table = {k: v[:ctx.max_windows] for k, v in table.items()}
    return crop, joints2d, valid2d, table


def _evaluate_chunk(ctx: _Context, loaded, failed):
    """Errors of one chunk -> (joints, samples, failed) arrow tables."""
    protocol, runner, size = ctx.protocol, ctx.runner, ctx.input_size
    device = runner.device
    failed = list(failed)
    prepared = []
    for index, sample in loaded:
        try:
            prepared.append((index, sample, *_prepare(ctx, index, sample)))
        except (UserError, ValueError, TypeError) as err:
            failed.append((index, sample.sample_id, str(err)))
    if not prepared:
        return _tables([], [], failed)

    crops = torch.from_numpy(np.stack([p[2] for p in prepared])).to(device)
    clean = crops.permute(0, 3, 1, 2).float().div_(255.0)
    if size != clean.shape[-1]:
        clean = F.interpolate(clean, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    n_slots = len(prepared)

    with runner.grad_context():
        clean_parts, clean_params, clean_pve = [], [], []
        gt_verts = _gt_vertices(prepared, protocol, device)
        for i in range(0, n_slots, ctx.batch_size):
            clean_parts.append(runner(clean[i:i + ctx.batch_size]))
            clean_params.append(_params_of(runner.last))
            clean_pve.append(_pve(runner.last, clean_parts[-1][1], clean_parts[-1][0], gt_verts,
                                  np.arange(i, min(i + ctx.batch_size, n_slots)), ctx.pelvis))
        clean_out = [torch.cat(parts) for parts in zip(*clean_parts)]
        from occbench import metrics
        c3d, croot, c2d = clean_out
        if protocol.reference == "gt":
            ref3d = torch.from_numpy(np.stack([np.asarray(p[1].joints3d, np.float32) for p in prepared]))
            ref3d = ref3d.to(device)
            ref2d_np = np.stack([p[3] if p[3] is not None else np.zeros((N_JOINTS, 2)) for p in prepared])
            valid2d_np = np.stack([p[4] for p in prepared])
        else:
            ref3d = metrics.align_pelvis(c3d, ctx.pelvis, pelvis=croot if ctx.pelvis == "h36m-root" else None)
            ref2d_np = c2d.cpu().numpy().astype(np.float64)
            valid2d_np = np.ones((n_slots, N_JOINTS), bool)
        ref2d = torch.as_tensor(ref2d_np, dtype=torch.float32, device=device)
        valid2d = torch.as_tensor(valid2d_np, device=device)
        head = metrics.head_size_lsp14(ref2d, mask=valid2d)
        finite3d = torch.isfinite(ref3d).all(-1)
        ref3d = torch.nan_to_num(ref3d)

        # one table for the chunk: clean rows (window -1) then every sample's windows, tagged by slot
        tables, slots = [], []
        for slot, p in enumerate(prepared):
            tables += [clean_table(), p[5]]
            slots += [np.full(1, slot), np.full(len(p[5]["window"]), slot)]
        table = {k: np.concatenate([t[k] for t in tables]) for k in TABLE_COLUMNS}
        slot = np.concatenate(slots)
        n_rows = len(slot)
        is_clean = table["window"] < 0

        scale = size / occ.CANONICAL_SIZE
        occluded = occ.points_inside(table, ref2d_np[slot] * scale) & ~is_clean[:, None]
        in_crop = ((ref2d_np[slot] >= 0) & (ref2d_np[slot] < occ.CANONICAL_SIZE)).all(-1) & valid2d_np[slot]
        visible = finite3d.cpu().numpy()[slot]
        if protocol.visible_only:
            visible = visible & ~occluded & in_crop
        pck_mask = visible & valid2d_np[slot]

        mpjpe = np.empty((n_rows, N_JOINTS), np.float32)
        pa_err = np.empty_like(mpjpe)
        pck = np.empty_like(mpjpe)
        axis_err = np.empty((n_rows, N_JOINTS, 3), np.float32)
        pve = np.full(n_rows, np.nan, np.float32)
        pve[np.flatnonzero(is_clean)] = np.concatenate(clean_pve)
        out3d = torch.empty(n_rows, N_JOINTS, 3, device=device)
        out_root = torch.empty(n_rows, 3, device=device)
        out2d = torch.empty(n_rows, N_JOINTS, 2, device=device)
        clean_rows = np.flatnonzero(is_clean)
        out3d[clean_rows], out_root[clean_rows], out2d[clean_rows] = c3d, croot, c2d
        window_rows = np.flatnonzero(~is_clean)
        for start in range(0, len(window_rows), ctx.batch_size):
            rows = window_rows[start:start + ctx.batch_size]
            batch_table = {k: v[rows] for k, v in table.items()}
            base = clean[torch.as_tensor(slot[rows], device=device)]
            if protocol.kind == "voc":
                images = ctx.voc.compose(base, batch_table, [prepared[s][1].sample_id for s in slot[rows]],
                                         protocol, ctx.seed)
            else:
                images = occ.compose(base, batch_table, ctx.textures)
            r = torch.as_tensor(rows, device=device)
            out3d[r], out_root[r], out2d[r] = runner(images)
            pve[rows] = _pve(runner.last, out_root[r], out3d[r], gt_verts, slot[rows], ctx.pelvis)
        for start in range(0, n_rows, 4096):   # errors in large slices: cheap next to the forward passes
            rows = np.arange(start, min(start + 4096, n_rows))
            r = torch.as_tensor(rows, device=device)
            s = torch.as_tensor(slot[rows], device=device)
            m, pm, pk, ax = joint_errors(
                out3d[r], out_root[r], out2d[r], ref3d[s], ref2d[s], head[s],
                torch.as_tensor(visible[rows], device=device), torch.as_tensor(pck_mask[rows], device=device),
                ctx.pelvis, protocol.pckh_threshold)
            mpjpe[rows], pa_err[rows], pck[rows], axis_err[rows] = m, pm, pk, ax
    ctx.stats["windows"] += len(window_rows)

    sample_index = np.array([p[0] for p in prepared])[slot]
    sample_ids = np.array([p[1].sample_id for p in prepared], dtype=object)[slot]
    joints = _joint_table(table, slot, sample_index, sample_ids, mpjpe, pa_err, pck, visible, occluded, in_crop,
                          axis_err, pve)
    summaries = [_summary(prepared[s], table, slot == s, mpjpe, pa_err, pck, visible, ctx)
                 for s in range(n_slots)]
    rotmat, betas, cam = (torch.cat(parts).float().cpu().numpy() for parts in zip(*clean_params))
    predictions = pa.table({"sample_index": pa.array([p[0] for p in prepared], pa.int64()),
                            "sample_id": [p[1].sample_id for p in prepared],
                            "rotmat": list(rotmat.reshape(n_slots, -1)), "betas": list(betas),
                            "cam": list(cam)}, schema=PREDICTION_SCHEMA)
    return _tables(joints, summaries, failed, predictions)


def _params_of(pred):
    return pred.rotmat.detach(), pred.betas.detach(), pred.cam.detach()


def _gt_vertices(prepared, protocol, device):
    """(n_slots,6890,3) GT vertices (pelvis-subtracted like the joints) when every sample has them."""
    verts = [p[1].vertices for p in prepared]
    if protocol.reference != "gt" or any(v is None for v in verts):
        return None
    return torch.from_numpy(np.stack([np.asarray(v, np.float32) for v in verts])).to(device)


def _pve(pred, root, joints, gt_verts, slots, pelvis: str) -> np.ndarray:
    """(B,) PVE in mm of a batch: predicted vertices minus the predicted pelvis (same convention as the joints)
    against the GT vertices; NaN without GT vertices (PARE's PVE: no other alignment)."""
    if gt_verts is None:
        return np.full(len(slots), np.nan, np.float32)
    origin = root if pelvis == "h36m-root" else joints[:, 2:4].mean(1)
    verts = pred.vertices.float() - origin[:, None, :]
    err = torch.linalg.vector_norm(verts - gt_verts[torch.as_tensor(np.asarray(slots), device=verts.device)], dim=-1)
    return (err.mean(-1) * 1000.0).cpu().numpy().astype(np.float32)


def _joint_table(table, slot, sample_index, sample_ids, mpjpe, pa_err, pck, visible, occluded, in_crop,
                 axis_err, pve):
    n_rows = len(slot)
    rep = lambda a: np.repeat(a, N_JOINTS)
    columns = {
        "sample_index": rep(sample_index), "sample_id": rep(sample_ids).astype(str),
        "window": rep(table["window"]).astype(np.int32), "joint": np.tile(np.arange(N_JOINTS, dtype=np.int8), n_rows),
        "mpjpe": mpjpe.reshape(-1), "pa_mpjpe": pa_err.reshape(-1), "pckh": pck.reshape(-1),
        "visible": visible.reshape(-1), "occluded": occluded.reshape(-1), "in_crop": in_crop.reshape(-1),
        "err_x": axis_err[..., 0].reshape(-1), "err_y": axis_err[..., 1].reshape(-1),
        "err_z": axis_err[..., 2].reshape(-1), "pve": rep(pve),
    }
    for name in TABLE_COLUMNS:
        if name != "window":
            columns[name] = rep(table[name]).astype(str) if TABLE_COLUMNS[name] is object else rep(table[name])
    return pa.table(columns, schema=JOINT_SCHEMA)


def _masked_mean(values, mask):
    count = mask.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(mask, values, 0).sum(-1) / np.maximum(count, 1), np.nan)


def _summary(prep, table, rows, mpjpe, pa_err, pck, visible, ctx: _Context):
    index, sample = prep[0], prep[1]
    window = table["window"][rows]
    m, p, k, v = mpjpe[rows], pa_err[rows], pck[rows], visible[rows]
    per_m, per_p = _masked_mean(m, v), _masked_mean(p, v)
    k_mask = v & np.isfinite(k)
    per_k = _masked_mean(np.nan_to_num(k), k_mask)
    clean, occl = window < 0, window >= 0
    row = {"sample_index": index, "sample_id": sample.sample_id, "n_windows": int(occl.sum()),
           "clean_mpjpe": per_m[clean][0], "clean_pa_mpjpe": per_p[clean][0], "clean_pckh": per_k[clean][0]}
    if occl.any():
        with np.errstate(invalid="ignore"), _quiet():
            row.update(mean_mpjpe=np.nanmean(per_m[occl]), mean_pa_mpjpe=np.nanmean(per_p[occl]),
                       mean_pckh=np.nanmean(per_k[occl]))
        scores = np.where(np.isfinite(per_m[occl]), per_m[occl], -np.inf)
        worst_local = int(np.argmax(scores))          # first window among equals, as numpy's argmax
        worst = np.flatnonzero(rows)[np.flatnonzero(occl)[worst_local]]
        texture = int(table["texture"][worst])
        row.update(worst_window=int(table["window"][worst]), worst_mpjpe=per_m[occl][worst_local],
                   worst_pa_mpjpe=per_p[occl][worst_local], worst_pckh=per_k[occl][worst_local],
                   worst_n_visible=int(visible[worst].sum()),
                   worst_texture=(ctx.textures.source.names[texture] if texture >= 0 and ctx.textures else ""),
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


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def _tables(joints, summaries, failed, predictions=None):
    if predictions is None:
        predictions = PREDICTION_SCHEMA.empty_table()
    if isinstance(joints, list):
        joints = JOINT_SCHEMA.empty_table()
    summary = pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA) if summaries else SUMMARY_SCHEMA.empty_table()
    fail = pa.table({"sample_index": [f[0] for f in failed], "sample_id": [str(f[1]) for f in failed],
                     "reason": [str(f[2]) for f in failed]}, schema=FAILED_SCHEMA)
    return {"joints": joints, "samples": summary, "failed": fail, "predictions": predictions}


# ------------------------------------------------------------------------------------------ metrics
def summarize(run: RunDir, chunks: list[int]) -> dict:
    """metrics.json from the chunk files, one chunk in memory at a time.

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
        worst = dict(zip(samples["sample_index"], samples["worst_window"]))
        is_clean = joints["window"].to_numpy() < 0
        is_worst = joints["window"].to_numpy() == joints["sample_index"].map(worst).to_numpy()
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
        out["per_joint"] = {n: _num(v) for n, v in zip(JOINT_NAMES, per_joint[0] / per_joint[1])}
    if groups:
        out["by_pattern_doc"] = [{"pattern": p, "doc": d, **a.result()} for (p, d), a in sorted(groups.items())]
    reduction = protocol["reduction"]
    if protocol["kind"] == "clean":
        source = "clean"
    else:
        source = "worst" if protocol["report"] == "worst" else "occluded"
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
            # per-sample: mean over joints of each (sample, window), then over windows, then samples
            per_window = rows.groupby(["sample_index", "window"])[name].mean()
            per_sample = per_window.groupby(level=0).mean()
            self.sample_sums[name] += float(per_sample.astype(np.float64).sum())
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


# ------------------------------------------------------------------------------------------ public API
def _versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("occbench", "torch", "numpy", "pandas", "pyarrow", "smplx", "scikit-image"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if result.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return result.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _textures_for(protocol: Protocol, input_size: int, dtd_root=None):
    if not protocol.uses_textures:
        return None, None
    if protocol.textures == "dtd" and dtd_root is not None:
        source = occ.dtd_source(dtd_root)
    else:
        if protocol.textures == "dtd":
            print("warning: no --dtd-root: using scikit-image's bundled images as textures; results are NOT "
                  "comparable to published AdvOcc numbers", file=sys.stderr)
        source = occ.skimage_source()
    bank = occ.TextureBank(source, short_side=input_size)
    info = {"kind": source.kind, "root": source.root, "count": len(source.names),
            "fingerprint": source.fingerprint(), "comparable": source.comparable}
    return bank, info


def _replay_windows(replay_dir, protocol: Protocol | None, seed: int | None):
    """(protocol, seed, {sample_id: [worst window]}, info) from a finished run directory."""
    from occbench.protocol import validate
    source = RunDir.load(replay_dir)
    samples_path = source.path / "samples.parquet"
    if not samples_path.is_file():
        raise UserError(f"--replay {replay_dir}: the run is not finished (no samples.parquet); finish it first")
    params = dict(source.config["protocol"])
    replayed = validate(params, origin=f"{replay_dir}/run.json")
    if protocol is not None and protocol.fingerprint() != replayed.fingerprint():
        raise UserError(f"--replay {replay_dir}: that run used protocol {replayed.name!r} with other parameters; "
                        "leave out --protocol or give the same one")
    import pyarrow.parquet as pq
    table = pq.read_table(samples_path, columns=["sample_id", "worst_window"]).to_pydict()
    only = {sid: [w] for sid, w in zip(table["sample_id"], table["worst_window"]) if w >= 0}
    info = {"run_dir": str(source.path.resolve()), "model": source.config.get("model", {}).get("name"),
            "seed": source.config["seed"], "n_windows": len(only)}
    return replayed, source.config["seed"], only, info, source.config.get("textures")


def run_protocol(model, dataset, protocol, out_dir=None, *, seed: int = 0, batch_size: int | None = None,
                 precision: str = "fp32", memory_format: str = "auto", limit: int | None = None,
                 max_windows: int | None = None,
                 shard: str | Shard | None = None, replay=None, dtd_root=None, voc_root=None,
                 chunk_samples: int | None = None, progress: bool = True, model_info: dict | None = None,
                 protocol_overrides: dict | None = None, quiet: bool = False) -> Path:
    """Run ``protocol`` for ``model`` on ``dataset``; return the run directory (resumed if it exists).

    model: a ZooModel (from :func:`occbench.load_model`); dataset: from :func:`occbench.open_dataset`;
    protocol: a :class:`Protocol`, a built-in name or a TOML path. replay: a finished run directory whose
    per-sample worst windows are evaluated (transfer of an adversarial set); the protocol and seed are
    then taken from that run. Shard: "k/N". chunk_samples: samples per resumable chunk (default from the
    windows per sample). Returns the run directory path.
    """
    replay_info, replay_textures = None, None
    only = None
    if replay is not None:
        given = load_protocol(protocol, **(protocol_overrides or {})) if protocol is not None else None
        protocol, seed, only, replay_info, replay_textures = _replay_windows(replay, given, seed)
    else:
        protocol = load_protocol(protocol, **(protocol_overrides or {}))
    shard = Shard.parse(shard) if not isinstance(shard, Shard) else shard
    device = next(model.parameters()).device
    input_size = int(getattr(model, "input_size", 224))
    textures, texture_info = _textures_for(protocol, input_size, dtd_root)
    if replay_textures is not None and texture_info is not None and \
            replay_textures.get("fingerprint") != texture_info["fingerprint"]:
        raise UserError(f"--replay {replay}: that run drew textures from another set "
                        f"({replay_textures.get('kind')} {replay_textures.get('root')}); pass the same --dtd-root")
    voc = None
    if protocol.kind == "voc":
        voc = occ.VocOccluders.open(voc_root)
    n_total = len(dataset)
    n_samples = min(n_total, limit) if limit else n_total
    per_sample = protocol.n_windows(input_size) or 1
    if max_windows is not None:
        per_sample = max(1, min(per_sample, max_windows))
    if replay is not None:
        per_sample = 1
    chunk_samples = chunk_samples or int(min(64, max(1, math.ceil(256 / (per_sample + 1)))))
    provenance = getattr(model, "provenance", {}) or {}
    model_name = (model_info or {}).get("name") or provenance.get("model") or getattr(model, "name", "model")
    conventions = dict(getattr(dataset, "conventions", {}) or {})
    pelvis = protocol.pelvis if protocol.pelvis != "dataset" else conventions.get("pelvis", "h36m-root")
    if protocol.reference == "gt" and conventions.get("pelvis", pelvis) != pelvis:
        # the GT joints arrive pelvis-subtracted with the dataset's convention; the prediction must match it
        raise UserError(f"protocol {protocol.name!r} asks for pelvis = {pelvis!r} but dataset "
                        f"{getattr(dataset, 'name', '')!r} gives GT aligned with {conventions['pelvis']!r}; "
                        "use pelvis = 'dataset'")
    if out_dir is None:
        tag = f"-shard{shard.index}of{shard.count}" if shard else ""
        tag += f"-limit{limit}" if limit else ""
        tag += "-replay" if replay is not None else ""
        out_dir = Path("runs") / f"{model_name}-{protocol.name}-{getattr(dataset, 'name', 'dataset')}-s{seed}{tag}"
    out_dir = Path(out_dir)

    runner = Runner(model, precision=precision,
                    memory_format="contiguous" if memory_format == "auto" else memory_format)
    existing = out_dir / "run.json"
    tuned = None
    if existing.is_file():   # resume: reuse the recorded batch size / format, results stay identical
        old = json.loads(existing.read_text())
        batch_size = batch_size or old.get("batch_size")
        if memory_format == "auto":
            memory_format = old.get("memory_format", "contiguous")
        chunk_samples = old.get("chunk_samples", chunk_samples)
    if batch_size is None or memory_format == "auto":
        formats = None if memory_format == "auto" else [memory_format]
        window_batch = per_sample * min(chunk_samples, max(1, n_samples))   # most windows one chunk holds
        tuned = autotune(runner, input_size, max_batch=max(1, min(64, window_batch)),
                         memory_formats=formats)
        batch_size = batch_size or tuned["batch_size"]
        memory_format = tuned["memory_format"]
    runner.set_memory_format(memory_format)

    body = getattr(model, "body_model", None)
    config = {
        "occbench_run": 1,
        "model": {"name": model_name, "class": type(model).__name__, "input_size": input_size,
                  "weights": provenance.get("weights"), "checkpoint": provenance.get("checkpoint"),
                  "checkpoint_sha256": provenance.get("checkpoint_sha256"),
                  "options": provenance.get("options"), **(model_info or {})},
        "dataset": {"name": getattr(dataset, "name", None), "n_total": n_total},
        "protocol": protocol.params(),
        "protocol_fingerprint": protocol.fingerprint(),
        "seed": int(seed),
        "precision": precision,
        "batch_size": int(batch_size),
        "memory_format": memory_format,
        "chunk_samples": int(chunk_samples),
        "n_samples": int(n_samples),
        "limit": limit,
        "max_windows": max_windows,
        "shard": str(shard) if shard else None,
        "textures": texture_info,
        "replay": replay_info,
        "conventions": {**conventions, "pelvis": pelvis, "joint_set": "lsp14",
                        "reduction": protocol.reduction, "pckh_threshold": protocol.pckh_threshold,
                        "body_model_standin": bool(getattr(body, "is_standin", False)),
                        "geometry_scale": f"{input_size}/224 (rounded half up), occluders drawn at {input_size} px"},
    }
    extra = {
        "dataset_provenance": getattr(dataset, "provenance", None),
        "model_provenance": provenance,
        "comparable": bool((texture_info or {}).get("comparable", True))
                      and not bool(getattr(body, "is_standin", False))
                      and provenance.get("weights", "checkpoint") != "random",
        "autotune": tuned,
        "device": {"type": device.type, "name": _device_name(device)},
        "versions": _versions(),
        "git_commit": _git_commit(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": "running",
    }
    run = RunDir.open_or_create(out_dir, {**config, **extra})
    ctx = _Context(protocol=protocol, runner=runner, input_size=input_size, seed=int(seed),
                   batch_size=int(batch_size), pelvis=pelvis, textures=textures, voc=voc, only=only,
                   max_windows=max_windows)
    chunks = plan_chunks(n_samples, chunk_samples, shard)
    todo = [c for c in chunks if not run.has_chunk(c[0])]
    total = sum(e - s for _, s, e in chunks)
    done = total - sum(e - s for _, s, e in todo)
    start = time.perf_counter()
    runner.forward_seconds = 0.0
    _execute(run, ctx, dataset, todo, total, done, progress and not quiet)
    if todo:
        wall = time.perf_counter() - start
        run.update(timing={"wall_s": round(wall, 3), "forward_s": round(runner.forward_seconds, 3),
                           "windows": ctx.stats["windows"], "samples": ctx.stats["samples"],
                           "forward_share": round(runner.forward_seconds / max(wall, 1e-9), 4),
                           "note": "this session's compute; forward_s is host time inside model calls "
                                   "(exact on CPU, launch time only on CUDA)"})
    metrics = summarize(run, [c for c, _, _ in chunks])
    run.concatenate([c for c, _, _ in chunks])
    write_json(run.path / "metrics.json", metrics)
    run.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if not quiet:
        print(format_summary(run.config, metrics))
        print(f"run directory: {run.path}")
    return run.path


def _execute(run, ctx, dataset, todo, total, done, progress):
    from tqdm import tqdm
    bar = tqdm(total=total, initial=done, unit="sample", disable=not progress, dynamic_ncols=True,
               desc=ctx.protocol.name)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_load_samples, dataset, *todo[0][1:]) if todo else None
        for i, (chunk, first, end) in enumerate(todo):
            loaded, failed = future.result()
            if i + 1 < len(todo):
                future = pool.submit(_load_samples, dataset, *todo[i + 1][1:])
            tables = _evaluate_chunk(ctx, loaded, failed)
            run.write_chunk(chunk, tables)
            ctx.stats["samples"] += end - first
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{ctx.stats['samples'] / elapsed:.2f} samples/s, "
                                f"{ctx.stats['windows'] / elapsed:.1f} windows/s")
            bar.update(end - first)
    bar.close()


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


def merge_runs(shard_dirs, out_dir) -> Path:
    """Join shard run directories of one run into ``out_dir``: identical to the unsharded run."""
    shards = [RunDir.load(d) for d in shard_dirs]
    if not shards:
        raise UserError("merge: give the shard run directories")
    first = shards[0].config
    for other in shards[1:]:
        for key in ("model", "dataset", "protocol", "seed", "precision", "batch_size", "memory_format",
                    "chunk_samples", "n_samples", "textures", "conventions", "replay"):
            if json.dumps(other.config.get(key), sort_keys=True) != json.dumps(first.get(key), sort_keys=True):
                raise UserError(f"merge: {other.path} differs from {shards[0].path} in {key!r}; "
                                "only shards of one run can be merged")
    counts = {s.config.get("shard", "").split("/")[-1] if s.config.get("shard") else "1" for s in shards}
    all_chunks = [c for c, _, _ in plan_chunks(first["n_samples"], first["chunk_samples"])]
    owner = {}
    for s in shards:
        for c in s.done_chunks():
            owner.setdefault(c, s)
    missing = [c for c in all_chunks if c not in owner]
    if missing:
        raise UserError(f"merge: chunks {missing[:10]} are in none of the shards (a shard is missing or "
                        f"unfinished; shard counts seen: {sorted(counts)})")
    config = {**first, "shard": None, "merged_from": [str(s.path.resolve()) for s in shards],
              "status": "running"}
    out = RunDir.open_or_create(out_dir, config) if not (Path(out_dir) / "run.json").is_file() \
        else RunDir(out_dir, config)
    (out.path / "chunks").mkdir(parents=True, exist_ok=True)
    for c in all_chunks:
        copy_chunks(owner[c], out, [c])
    metrics = summarize(out, all_chunks)
    out.concatenate(all_chunks)
    write_json(out.path / "metrics.json", metrics)
    out.update(**{**config, "status": "complete"})
    print(format_summary(out.config, metrics))
    print(f"run directory: {out.path}")
    return out.path


def benchmark(model="pare", protocol="clean", dataset="demo", *, out_dir=None, weights="checkpoint",
              checkpoint=None, device=None, model_options: dict | None = None, dataset_root=None,
              **run_options) -> Path:
    """One call from names to a finished run directory (RobustBench style)::

        run_dir = occbench.benchmark(model="pare", protocol="advocc80", dataset="demo", weights="random")

    model / dataset may also be objects (a ZooModel, a Dataset). Other keywords go to :func:`run_protocol`.
    """
    from occbench.data import open_dataset
    from occbench.zoo import load_model
    if isinstance(model, str):
        model = load_model(model, checkpoint=checkpoint, device=device, weights=weights,
                           seed=run_options.get("seed", 0), **(model_options or {}))
    if isinstance(dataset, str):
        dataset = open_dataset(dataset, root=dataset_root)
    return run_protocol(model, dataset, protocol, out_dir, **run_options)

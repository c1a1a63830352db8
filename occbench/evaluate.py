"""Evaluating one chunk of samples: prepare -> clean forward -> occluded windows -> scores -> tables.

:func:`evaluate_chunk` is a pure function of a :class:`ChunkContext` (picklable: the protocol, the runner
with its model, texture and VOC banks) and the loaded samples, so chunks may be evaluated in other processes.

Why occluders are drawn at the model's input size: REFERENCE.md 1 scales all geometry by input_size / 224
(rounded), which is how 3DNBF draws its patches (57 px at 320, integer edges); drawing at 224 and resizing
would blur the patch edges and make it 57.14 px.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from occbench import metrics, occluders, rundir, scoring
from occbench import windows as win
from occbench.data.joints import LSP14_NAMES
from occbench.errors import UserError
from occbench.protocol import Protocol
from occbench.runner import Runner
from occbench.search import SearchParams, search_worst_windows
from occbench.voc import VocOccluders

N_JOINTS = len(LSP14_NAMES)
ERROR_ROWS = 4096       # errors are computed in slices of this many rows: cheap next to the forward passes


@dataclass
class ChunkContext:
    """Everything a chunk's evaluation needs besides its samples."""

    protocol: Protocol
    runner: Runner
    input_size: int
    seed: int
    batch_size: int
    pelvis: str
    textures: occluders.TextureBank | None = None
    voc: VocOccluders | None = None
    only: dict | None = None          # replay: sample_id -> [window]
    max_windows: int | None = None    # only each sample's first N windows (quick looks, benchmarks)
    crop_from: str = "canonical"      # "image": the model's input is cut from the source image at input_size
                                      # (Sample.model_crop); "canonical": the 224 px crop resized (bilinear)
    search: SearchParams | None = None  # adaptive worst-window search (occbench.search); None: every window


@dataclass
class PreparedSample:
    """One sample ready to evaluate: validated reference arrays and its window table."""

    index: int                        # dataset index
    sample: object                    # the dataset's Sample
    crop: np.ndarray                  # (224,224,3) uint8
    model_crop: np.ndarray | None     # (S,S,3) uint8 at the model's input size, cut from the source image
    joints2d: np.ndarray | None       # (14,2) GT 2D in 224 px, or None
    valid2d: np.ndarray               # (14,) bool
    windows: dict                     # the window table (occbench.windows)


def load_samples(dataset, start: int, end: int, model_input_size: int | None = None):
    """([(index, sample)], [(index, sample_id, reason)]) of dataset indices start..end-1; with
    ``model_input_size`` each sample also carries its crop at that size cut from the source image, when the
    dataset can (``Dataset.sample``; a dataset object with only ``__getitem__`` gives 224 px crops)."""
    loaded, failed = [], []
    ids = getattr(dataset, "sample_ids", None)
    direct = model_input_size is not None and hasattr(dataset, "sample")
    for index in range(start, end):
        try:
            loaded.append((index, dataset.sample(index, model_input_size=model_input_size) if direct
                           else dataset[index]))
        except Exception as err:  # an unreadable sample must not stop the run; the reason is recorded
            sample_id = str(ids[index]) if ids is not None else f"#{index}"
            failed.append((index, sample_id, f"{type(err).__name__}: {err}"))
    return loaded, failed


def load_chunk(ctx: ChunkContext, dataset, start: int, end: int):
    """:func:`load_samples` of a chunk, with the model-size crops the context's model is fed."""
    return load_samples(dataset, start, end, ctx.input_size if ctx.crop_from == "image" else None)


def crop_from(model, dataset, input_size: int) -> str:
    """"image" when the model's input is cut from the source image at its input size, else "canonical"."""
    if input_size != 224 and getattr(model, "crop_from", "image") == "image" and hasattr(dataset, "sample"):
        return "image"
    return "canonical"


def crop_resolution(model, dataset, input_size: int) -> str:
    """How the model's input pixels were made (run.json conventions.crop_resolution)."""
    if input_size == 224:
        return "224 px cut from the source image"
    if crop_from(model, dataset, input_size) == "image":
        return f"{input_size} px cut from the source image (the model's own crop; geometry in the 224 px crop)"
    why = ("the model was trained by occbench on 224 px crops resampled to its input size"
           if getattr(model, "crop_from", "image") == "canonical" else "the dataset gives 224 px crops only")
    return f"224 px crop resized to {input_size} px (bilinear): {why}"


def prepare_sample(ctx: ChunkContext, index: int, sample) -> PreparedSample:
    """Validated reference arrays + window table of one sample; raises UserError with the reason."""
    crop = np.asarray(sample.crop)
    if crop.shape != (224, 224, 3) or crop.dtype != np.uint8:
        raise UserError(f"crop must be (224,224,3) uint8, got {crop.shape} {crop.dtype}")
    model_crop = getattr(sample, "model_crop", None) if ctx.crop_from == "image" else None
    if model_crop is not None:
        model_crop = np.asarray(model_crop)
        if model_crop.shape != (ctx.input_size, ctx.input_size, 3) or model_crop.dtype != np.uint8:
            raise UserError(f"model crop must be ({ctx.input_size},{ctx.input_size},3) uint8, got "
                            f"{model_crop.shape} {model_crop.dtype}")
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
    table = ctx.protocol.windows(sample.sample_id, ctx.input_size, ctx.seed, joints2d=joints2d,
                                 joints2d_valid=valid2d, textures=ctx.textures, only=only)
    if ctx.max_windows is not None:
        table = win.select(table, slice(None, ctx.max_windows))
    return PreparedSample(index, sample, crop, model_crop, joints2d, valid2d, table)


def evaluate_chunk(ctx: ChunkContext, loaded, failed) -> dict:
    """Errors of one chunk -> its tables {joints, samples, failed, predictions} (:mod:`occbench.rundir`)."""
    protocol, runner, size = ctx.protocol, ctx.runner, ctx.input_size
    device = runner.device
    failed = list(failed)
    prepared = []
    for index, sample in loaded:
        try:
            prepared.append(prepare_sample(ctx, index, sample))
        except (UserError, ValueError, TypeError) as err:
            failed.append((index, sample.sample_id, str(err)))
    if not prepared:
        return rundir.chunk_tables(None, [], failed)

    clean = clean_inputs(prepared, size, device)
    n_slots = len(prepared)

    with runner.grad_context():
        clean_parts, clean_params, clean_pve = [], [], []
        gt_verts = _gt_vertices(prepared, protocol, device)
        for i in range(0, n_slots, ctx.batch_size):
            clean_parts.append(runner(clean[i:i + ctx.batch_size]))
            clean_params.append(_params_of(runner.last))
            clean_pve.append(scoring.vertex_errors(runner.last, clean_parts[-1][1], clean_parts[-1][0], gt_verts,
                                                   np.arange(i, min(i + ctx.batch_size, n_slots)), ctx.pelvis))
        clean_out = [torch.cat(parts) for parts in zip(*clean_parts)]
        c3d, croot, c2d = clean_out
        if protocol.reference == "gt":
            ref3d = torch.from_numpy(np.stack([np.asarray(p.sample.joints3d, np.float32) for p in prepared]))
            ref3d = ref3d.to(device)
            ref2d_np = np.stack([p.joints2d if p.joints2d is not None else np.zeros((N_JOINTS, 2))
                                 for p in prepared])
            valid2d_np = np.stack([p.valid2d for p in prepared])
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
            tables += [win.clean_table(), p.windows]
            slots += [np.full(1, slot), np.full(len(p.windows["window"]), slot)]
        table = win.concatenate(tables)
        slot = np.concatenate(slots)
        n_rows = len(slot)
        is_clean = table["window"] < 0

        scale = size / win.CANONICAL_SIZE
        occluded = occluders.points_inside(table, ref2d_np[slot] * scale) & ~is_clean[:, None]
        in_crop = ((ref2d_np[slot] >= 0) & (ref2d_np[slot] < win.CANONICAL_SIZE)).all(-1) & valid2d_np[slot]
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
        sample_ids = np.array([p.sample.sample_id for p in prepared], dtype=object)

        def forward(window_rows):
            for start in range(0, len(window_rows), ctx.batch_size):
                rows = window_rows[start:start + ctx.batch_size]
                base = clean[torch.as_tensor(slot[rows], device=device)]
                images = protocol.compose(base, win.select(table, rows), list(sample_ids[slot[rows]]), ctx.seed,
                                          textures=ctx.textures, objects=ctx.voc)
                r = torch.as_tensor(rows, device=device)
                out3d[r], out_root[r], out2d[r] = runner(images, clean, slot[rows])
                pve[rows] = scoring.vertex_errors(runner.last, out_root[r], out3d[r], gt_verts, slot[rows],
                                                  ctx.pelvis)

        def score(all_rows):
            for start in range(0, len(all_rows), ERROR_ROWS):
                rows = all_rows[start:start + ERROR_ROWS]
                r = torch.as_tensor(rows, device=device)
                s = torch.as_tensor(slot[rows], device=device)
                m, pm, pk, ax = scoring.joint_errors(
                    out3d[r], out_root[r], out2d[r], ref3d[s], ref2d[s], head[s],
                    torch.as_tensor(visible[rows], device=device), torch.as_tensor(pck_mask[rows], device=device),
                    ctx.pelvis, protocol.pckh_threshold)
                mpjpe[rows], pa_err[rows], pck[rows], axis_err[rows] = m, pm, pk, ax

        if ctx.search is None:
            forward(window_rows)
            score(np.arange(n_rows))
        else:
            score(clean_rows)
            searched = _search_worst_windows(ctx, slot, is_clean, mpjpe, visible,
                                             lambda rows: (forward(rows), score(rows)))
            # the run keeps the windows the search evaluated: rows identical to the exhaustive run's rows
            keep = np.flatnonzero(is_clean | searched)
            table, slot = win.select(table, keep), slot[keep]
            mpjpe, pa_err, pck, axis_err, pve = mpjpe[keep], pa_err[keep], pck[keep], axis_err[keep], pve[keep]
            visible, occluded, in_crop = visible[keep], occluded[keep], in_crop[keep]
        if runner.incremental is not None:
            runner.incremental.release()

    sample_index = np.array([p.index for p in prepared])
    joints = rundir.joint_table(table, sample_index[slot], sample_ids[slot], mpjpe=mpjpe, pa_mpjpe=pa_err,
                                pckh=pck, visible=visible, occluded=occluded, in_crop=in_crop,
                                axis_err=axis_err, pve=pve)
    texture_names = ctx.textures.source.names if ctx.textures else None
    summaries = [scoring.sample_summary(p.index, p.sample.sample_id, table, slot == s, mpjpe, pa_err, pck,
                                        visible, texture_names)
                 for s, p in enumerate(prepared)]
    rotmat, betas, cam = (torch.cat(parts).float().cpu().numpy() for parts in zip(*clean_params))
    predictions = rundir.prediction_table(sample_index, list(sample_ids), rotmat, betas, cam)
    return rundir.chunk_tables(joints, summaries, failed, predictions)


def clean_inputs(prepared: list, size: int, device) -> torch.Tensor:
    """(N,3,size,size) RGB [0,1] model inputs of the prepared samples: their crops cut at ``size`` from the
    source images when every sample has one, else the 224 px crops resized (bilinear, no antialias, as
    ``ZooModel.preprocess`` and `occbench train` resample them)."""
    if all(p.model_crop is not None for p in prepared):
        crops = torch.from_numpy(np.stack([p.model_crop for p in prepared])).to(device)
        return crops.permute(0, 3, 1, 2).float().div_(255.0)
    crops = torch.from_numpy(np.stack([p.crop for p in prepared])).to(device)
    clean = crops.permute(0, 3, 1, 2).float().div_(255.0)
    if size != clean.shape[-1]:
        clean = F.interpolate(clean, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return clean


def _search_worst_windows(ctx: ChunkContext, slot, is_clean, mpjpe, visible, evaluate_rows) -> np.ndarray:
    """The adaptive search (:mod:`occbench.search`) of every sample of the chunk, round by round: each round
    evaluates the windows all searching samples ask for (``evaluate_rows(rows)`` fills their errors), so
    forward batches span samples. Returns (n_rows,) bool: the window rows evaluated."""
    n_axis = ctx.protocol.grid(ctx.input_size)[2]
    # a grid table holds windows 0..N-1 in order right after the sample's clean row
    first_window_row = np.flatnonzero(is_clean) + 1
    evaluated = np.zeros(len(slot), bool)

    def evaluate(requests):
        rows = np.concatenate([first_window_row[s] + w for s, w in enumerate(requests)])
        evaluate_rows(rows)
        evaluated[rows] = True
        scores = scoring.window_scores(mpjpe[rows], visible[rows])
        return np.split(scores, np.cumsum([len(w) for w in requests])[:-1])

    search_worst_windows([(n_axis, n_axis)] * len(first_window_row), evaluate, ctx.search)
    return evaluated


def _params_of(pred):
    return pred.rotmat.detach(), pred.betas.detach(), pred.cam.detach()


def _gt_vertices(prepared, protocol, device):
    """(n_slots,6890,3) GT vertices (pelvis-subtracted like the joints) when every sample has them."""
    verts = [p.sample.vertices for p in prepared]
    if protocol.reference != "gt" or any(v is None for v in verts):
        return None
    return torch.from_numpy(np.stack([np.asarray(v, np.float32) for v in verts])).to(device)

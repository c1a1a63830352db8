"""``occbench train``: train or fine-tune a zoo model on a dataset occbench reads.

Pipeline (all tensors batched, CPU or CUDA):

1. :func:`load_training_set` reads every sample once into memory: the 224 px crop (N,3,224,224) uint8, the
   part-label crop (N,224,224) uint8 when the set has part PNGs (synthetic sets: 0 background, 1..24 SMPL
   part + 1), GT LSP-14 3D joints (pelvis-subtracted, the dataset's convention) and 2D joints (crop px), SMPL
   rotations / betas and, from the GT body, SMPL 24 joints, torso relative depths (BoPR) and a
   weak-perspective GT camera fitted to the 2D joints (to place SMPL joints in 2D for BoPR / HKMR).
2. :func:`augment` per step: random scale / translation of the crop (one affine warp straight to the
   model's input size; 2D targets follow), colour jitter, and random synthetic occluders (rectangles or
   ellipses filled with a colour, noise or a patch of another image in the batch); occluded pixels become
   background in the part labels (they show no body part).
3. the model's :meth:`~occbench.models.base.ZooModel.training_losses`: PARE Eq. 2 by default
   (:mod:`occbench.losses`: L_3D, L_2D, L_SMPL, plus L_P for models that return ``part_maps`` when part
   labels exist); BoPR's own loss (relative depth, auxiliary 2D/3D, body / part attention) and HKMR's
   per-outer-iteration loss override it in their modules.
4. Adam with a constant learning rate or (``lr_schedule='cosine'``) a short linear warm-up then cosine decay
   to 1 % of ``lr`` over ``steps``; every ``save_every`` steps FILE.state holds model + optimizer + step +
   RNG states, so ``resume=True`` continues the step count and reproduces the uninterrupted run.

The result is a checkpoint in the model's own container (Lightning for PARE, mmcv for 3DNBF,
{'model': ...} otherwise) that :func:`occbench.zoo.load_model` loads strictly, and FILE.json describing how
it was trained; load_model copies its ``trained_on`` into ``model.provenance``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from occbench.checks import check_seed, resolve_device
from occbench.errors import UserError
from occbench.losses import DEFAULT_WEIGHTS

TRAINED_ON_SYNTHETIC = "synthetic stand-in data, not comparable to published numbers"
CROP = 224
HALF = CROP / 2.0
CONTAINERS = {"lightning": ("lightning", "model."), "mmcv": ("mmcv", ""), "model-dict": ("model-dict", ""),
              "occbench": ("model-dict", "")}


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the sidecar and the resume state)."""

    model: str
    dataset: str
    out: str
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    lr_schedule: str = "constant"        # "constant" or "cosine" (warm-up, then decay over `steps`)
    seed: int = 0
    options: dict = field(default_factory=dict)        # architecture options of the zoo entry
    loss_weights: dict = field(default_factory=dict)   # overrides of DEFAULT_WEIGHTS
    part_loss_steps: int | None = None   # L_P only for the first N steps (PARE's hybrid schedule); None = all
    augment: bool = True
    scale_jitter: float = 0.15           # crop scale factor in [1 - j, 1 + j]
    translate_jitter: float = 0.08       # translation in [-j, j] x 224 px
    color_jitter: float = 0.3
    occluder_prob: float = 0.5           # probability of a synthetic occluder per sample
    limit: int | None = None             # first N samples of the dataset
    init_checkpoint: str | None = None   # fine-tune from these weights (loaded strictly)
    half: bool = False                   # store float tensors as fp16 (load_model casts back to fp32)
    save_every: int = 50
    device: str | None = None
    num_threads: int | None = None


# ------------------------------------------------------------------------------------------ data
@dataclass
class TrainingSet:
    """In-memory training tensors (N samples). Lengths in metres, 2D in 224-crop px."""

    name: str
    provenance: dict
    pelvis: str
    crops: torch.Tensor          # (N,3,224,224) uint8
    parts: torch.Tensor | None   # (N,224,224) uint8 part labels (0 background) or None
    joints3d: torch.Tensor       # (N,14,3) GT LSP-14, pelvis-subtracted
    joints2d: torch.Tensor       # (N,14,2) crop px
    valid2d: torch.Tensor        # (N,14) bool
    has_smpl: torch.Tensor       # (N,) bool
    rotmat: torch.Tensor         # (N,24,3,3) GT rotations (identity where no SMPL)
    betas: torch.Tensor          # (N,10)
    smpl_joints: torch.Tensor    # (N,24,3) GT SMPL joints relative to SMPL joint 0
    smpl_joints2d: torch.Tensor  # (N,24,2) crop px (fitted GT camera)
    rel_depth: torch.Tensor      # (N,24,3) BoPR torso-plane depths of the part centres

    def __len__(self) -> int:
        return self.crops.shape[0]


def _part_label_files(dataset) -> list | None:
    """Per-sample part-label PNG paths of a synthetic set (its annotations hold ``partname``), else None."""
    files = list(dataset.provenance.get("files", {}))
    if not files or "synthetic" not in dataset.provenance:
        return None
    ann = Path(files[0])
    with np.load(ann, allow_pickle=False) as data:
        if "partname" not in data:
            return None
        names = [str(x) for x in data["partname"]]
    return [str(ann.parent / n) for n in names[:len(dataset)]]


def load_training_set(dataset, limit: int | None = None, progress: bool = True) -> TrainingSet:
    """Read every sample of an opened :class:`occbench.data.Dataset` into a :class:`TrainingSet`."""
    import cv2

    from occbench.body import vertex_part_labels
    from occbench.camera import fit_weak_camera
    from occbench.data.crop import crop_transform
    from occbench.models.bopr import part_centres, relative_torso_depths
    from occbench.rotations import axis_angle_to_rotmat

    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n < 1:
        raise UserError(f"dataset {dataset.name!r} has no samples to train on")
    part_files = _part_label_files(dataset)
    crops = np.zeros((n, CROP, CROP, 3), np.uint8)
    parts = np.zeros((n, CROP, CROP), np.uint8) if part_files else None
    j3d = np.zeros((n, 14, 3), np.float32)
    j2d = np.zeros((n, 14, 2), np.float32)
    v2d = np.zeros((n, 14), bool)
    has = np.zeros(n, bool)
    pose = np.zeros((n, 72), np.float32)
    betas = np.zeros((n, 10), np.float32)
    iterator = range(n)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"loading {dataset.name}", unit="sample", leave=False)
    for i in iterator:
        s = dataset[i]
        crops[i] = s.crop
        if s.joints3d is None:
            raise UserError(f"{dataset.name}: sample {s.sample_id} has no 3D ground truth; training needs it")
        j3d[i] = s.joints3d
        if s.joints2d is not None:
            j2d[i], v2d[i] = s.joints2d, s.joints2d_valid
        if s.pose is not None:
            has[i], pose[i], betas[i] = True, s.pose, s.betas
        if parts is not None:
            labels = cv2.imread(part_files[i], cv2.IMREAD_UNCHANGED)
            if labels is None:
                raise UserError(f"{part_files[i]}: part-label image missing or unreadable; regenerate the set "
                                "(occbench datasets make-synthetic)")
            if labels.ndim == 3:
                labels = labels[..., 0]
            parts[i] = cv2.warpAffine(labels, crop_transform(s.center, s.scale, CROP), (CROP, CROP),
                                      flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # SMPL targets from the GT body (neutral: the body the training predictions use)
    body = dataset.body_model("neutral")
    rotmat = axis_angle_to_rotmat(torch.as_tensor(pose).reshape(-1, 3)).reshape(n, 24, 3, 3)
    rotmat[~torch.as_tensor(has)] = torch.eye(3)
    smpl_joints = torch.zeros(n, 24, 3)
    smpl_rel_pelvis = torch.zeros(n, 24, 3)
    rel_depth = torch.zeros(n, 24, 3)
    labels_v = torch.as_tensor(vertex_part_labels(body))
    with torch.no_grad():
        for lo in range(0, n, 64):
            hi = min(n, lo + 64)
            out = body(rotmat=rotmat[lo:hi], betas=torch.as_tensor(betas[lo:hi]))
            smpl_joints[lo:hi] = out.joints_smpl - out.joints_smpl[:, :1]
            pelvis = (out.joints_h36m[:, :1] if dataset.pelvis == "h36m-root"
                      else out.joints_lsp[:, 2:4].mean(1, keepdim=True))
            smpl_rel_pelvis[lo:hi] = out.joints_smpl - pelvis
            rel_depth[lo:hi] = relative_torso_depths(part_centres(out.vertices, labels_v), out.joints_smpl)
    smpl2d = np.zeros((n, 24, 2), np.float32)
    for i in range(n):
        a, b = fit_weak_camera(j3d[i], j2d[i], v2d[i])
        smpl2d[i] = a * smpl_rel_pelvis[i, :, :2].numpy() + b
    return TrainingSet(
        name=dataset.name, provenance=_json_safe(dataset.provenance), pelvis=dataset.pelvis,
        crops=torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous(),
        parts=None if parts is None else torch.from_numpy(parts), joints3d=torch.from_numpy(j3d),
        joints2d=torch.from_numpy(j2d), valid2d=torch.from_numpy(v2d), has_smpl=torch.from_numpy(has),
        rotmat=rotmat, betas=torch.from_numpy(betas), smpl_joints=smpl_joints,
        smpl_joints2d=torch.from_numpy(smpl2d), rel_depth=rel_depth)


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ------------------------------------------------------------------------------------ augmentation
@dataclass
class Batch:
    """One training batch on the device. images normalised (B,3,S,S) at the model's input size; parts
    (B,S,S) int64 or None; joints2d / smpl_joints2d in 224-crop px after augmentation; the rest as in
    :class:`TrainingSet`."""

    images: torch.Tensor
    parts: torch.Tensor | None
    joints3d: torch.Tensor
    joints2d: torch.Tensor
    valid2d: torch.Tensor
    has_smpl: torch.Tensor
    rotmat: torch.Tensor
    betas: torch.Tensor
    smpl_joints: torch.Tensor
    smpl_joints2d: torch.Tensor
    rel_depth: torch.Tensor


def _uniform(gen, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def augment(data: TrainingSet, index: torch.Tensor, cfg: TrainConfig, input_size: int, normalization,
            gen: torch.Generator, device) -> Batch:
    """Batch ``index`` of ``data``, augmented with random draws from ``gen`` (CPU generator: the same
    seed gives the same batches on every device)."""
    b = len(index)
    crops = data.crops[index].float() / 255.0                    # (B,3,224,224)
    parts = data.parts[index].float()[:, None] if data.parts is not None else None
    if cfg.augment:
        scale = _uniform(gen, b, 1 - cfg.scale_jitter, 1 + cfg.scale_jitter)
        shift = _uniform(gen, b * 2, -cfg.translate_jitter, cfg.translate_jitter).view(b, 2) * CROP
    else:
        scale, shift = torch.ones(b), torch.zeros(b, 2)
    # output px p_out = scale (p_in - c) + c + shift, c = crop centre; in grid_sample's normalised
    # coordinates (align_corners=False): u_out = scale u_in + shift / 112
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = -shift / HALF / scale[:, None]
    grid = F.affine_grid(theta, (b, 3, input_size, input_size), align_corners=False)
    images = F.grid_sample(crops, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if parts is not None:
        parts = F.grid_sample(parts, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    centre = HALF - 0.5

    def move(points):
        return scale[:, None, None] * (points - centre) + centre + shift[:, None]

    joints2d, smpl2d = move(data.joints2d[index]), move(data.smpl_joints2d[index])
    if cfg.augment and cfg.color_jitter > 0:
        j = cfg.color_jitter
        bright = _uniform(gen, b, 1 - j, 1 + j).view(b, 1, 1, 1)
        contrast = _uniform(gen, b, 1 - j, 1 + j).view(b, 1, 1, 1)
        sat = _uniform(gen, b, 1 - j, 1 + j).view(b, 1, 1, 1)
        gain = _uniform(gen, b * 3, 1 - j / 3, 1 + j / 3).view(b, 3, 1, 1)
        images = images * bright * gain
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * contrast + mean
        grey = images.mean(dim=1, keepdim=True)
        images = ((images - grey) * sat + grey).clamp(0, 1)
    if cfg.augment and cfg.occluder_prob > 0:
        images, parts = add_occluders(images, parts, cfg.occluder_prob, gen)
    mean = images.new_tensor(normalization[0]).view(1, 3, 1, 1)
    std = images.new_tensor(normalization[1]).view(1, 3, 1, 1)
    images = (images - mean) / std
    to = dict(device=device)
    return Batch(images=images.to(**to), parts=None if parts is None else parts.round().long().to(**to),
                 joints3d=data.joints3d[index].to(**to), joints2d=joints2d.to(**to),
                 valid2d=data.valid2d[index].to(**to), has_smpl=data.has_smpl[index].to(**to),
                 rotmat=data.rotmat[index].to(**to), betas=data.betas[index].to(**to),
                 smpl_joints=data.smpl_joints[index].to(**to), smpl_joints2d=smpl2d.to(**to),
                 rel_depth=data.rel_depth[index].to(**to))


def add_occluders(images: torch.Tensor, parts: torch.Tensor | None, prob: float, gen: torch.Generator):
    """Random synthetic occluders. images (B,3,S,S) in [0,1]; parts (B,S,S) or None.

    Each sample gets an occluder with probability ``prob``: a rectangle or an ellipse, side 15-50 % of the
    crop, centred anywhere in the middle 80 %, filled with a flat colour, uniform noise, or the same
    region of another image of the batch (real texture). Occluded part labels become background.
    """
    b, _, s, _ = images.shape
    use = torch.rand(b, generator=gen) < prob
    cx, cy = _uniform(gen, b, 0.1, 0.9) * s, _uniform(gen, b, 0.1, 0.9) * s
    w, h = _uniform(gen, b, 0.15, 0.5) * s, _uniform(gen, b, 0.15, 0.5) * s
    ellipse = torch.rand(b, generator=gen) < 0.5
    kind = torch.randint(0, 3, (b,), generator=gen)
    colour = torch.rand(b, 3, 1, 1, generator=gen)
    noise = torch.rand(b, 3, s, s, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    dx = (xx[None] - cx.view(b, 1, 1)) / (w.view(b, 1, 1) / 2)
    dy = (yy[None] - cy.view(b, 1, 1)) / (h.view(b, 1, 1) / 2)
    rect = (dx.abs() <= 1) & (dy.abs() <= 1)
    ell = dx ** 2 + dy ** 2 <= 1
    mask = torch.where(ellipse.view(b, 1, 1), ell, rect) & use.view(b, 1, 1)          # (B,S,S)
    other = images.roll(1, dims=0)
    fill = torch.where(kind.view(b, 1, 1, 1) == 0, colour.expand(b, 3, s, s),
                       torch.where(kind.view(b, 1, 1, 1) == 1, noise, other))
    images = torch.where(mask[:, None], fill, images)
    if parts is not None:
        parts = parts.masked_fill(mask, 0)
    return images, parts


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainResult:
    checkpoint: Path
    sidecar: Path
    steps: int
    history: list          # [(step, total loss)] at every step
    first_loss: float
    last_loss: float


def _build(cfg: TrainConfig, device):
    from occbench.body import load_mean_params
    from occbench.models import build_model, get_entry

    try:
        entry = get_entry(cfg.model)
    except KeyError as err:
        raise UserError(str(err.args[0])) from None
    if cfg.model == "3dnbf":
        raise UserError("3dnbf: train its regressor with --model 3dnbf-reg (same state dict); training the "
                        "Neural Body Volume features (3DNBF's contrastive loss) is not implemented")
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, mean_params=load_mean_params(), **cfg.options)
    except TypeError as err:
        raise UserError(f"{cfg.model}: bad architecture option ({err}); options of this entry: "
                        f"{entry.options}") from None
    except ValueError as err:
        raise UserError(f"{cfg.model}: {err}") from None
    if cfg.init_checkpoint:
        from occbench.checkpoints import load_checkpoint_into
        load_checkpoint_into(model, cfg.init_checkpoint, strip_prefixes=entry.strip_prefixes,
                             known_unused=entry.known_unused)
    return model.to(device), entry


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimisation step ``step`` (0-based). 'cosine': linear warm-up over the first 2 % of
    ``cfg.steps`` (at least one step), then cosine decay from ``cfg.lr`` to 1 % of it at ``cfg.steps``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warmup = max(1, cfg.steps // 50)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _rng_state(gen):
    """RNG states as tensors and numbers only, so the resume state loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def _set_rng_state(gen, rng: dict) -> None:
    gen.set_state(rng["gen"])
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def _load_state(state_path: Path, device) -> dict:
    """The resume state, read without running pickled code (``weights_only``: tensors and plain values)."""
    import pickle
    import re
    try:
        return torch.load(state_path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        why = (f"it names {found.group(1)}, which a resume state never holds" if found
               else f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}")
        raise UserError(f"--resume: refusing {state_path} ({why}; occbench reads it without running pickled "
                        "code); delete it and start again without --resume") from None


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def _config_key(cfg: TrainConfig) -> dict:
    """The fields a resumed run must share with the interrupted one."""
    d = asdict(cfg)
    # a decaying schedule depends on the total step count, so that one must match too
    for k in ("save_every", "device", "num_threads", "out") + (("steps",) if cfg.lr_schedule == "constant" else ()):
        d.pop(k)
    return d


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, stop_after: int | None = None,
          dataset=None) -> TrainResult:
    """Train ``cfg.model`` for ``cfg.steps`` steps and write ``cfg.out`` + ``cfg.out.json``.

    resume: continue from ``cfg.out + '.state'`` (the step count, optimizer, RNG and loss history go on).
    stop_after: stop (saving the resume state) after this many steps in total, as an interruption would.
    dataset: an opened Dataset (else ``open_dataset(cfg.dataset)``).
    """
    from occbench.data import open_dataset

    if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise UserError("steps and batch size must be >= 1 and lr > 0")
    check_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit {cfg.limit!r}: must be an integer >= 1 (leave it out for every sample)")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"unknown learning-rate schedule {cfg.lr_schedule!r}; use one of {LR_SCHEDULES}")
    out = Path(cfg.out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    model, entry = _build(cfg, device)            # a bad model name or option fails before data loading
    if dataset is None:
        dataset = open_dataset(cfg.dataset)
    data = load_training_set(dataset, cfg.limit, progress=progress)
    body = dataset.body_model("neutral").to(device)   # the body the GT was made with (stand-in for synthetic sets)
    model.attach_body_model(body)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history, seconds_before = 0, [], 0.0
    state_path = _state_path(out)
    if resume:
        if not state_path.is_file():
            raise UserError(f"--resume: no resume state {state_path}; start without --resume")
        state = _load_state(state_path, device)
        if state["config"] != _config_key(cfg):
            diff = {k: (state["config"].get(k), v) for k, v in _config_key(cfg).items()
                    if state["config"].get(k) != v}
            raise UserError(f"--resume: {state_path} was made with other settings (stored vs now: {diff})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(gen, state["rng"])
        step, history = int(state["step"]), list(state["history"])
        seconds_before = state.get("seconds", math.nan)   # NaN: a state written before times were stored
    else:
        torch.manual_seed(cfg.seed)
    weights = {**DEFAULT_WEIGHTS, **cfg.loss_weights}
    end = cfg.steps if stop_after is None else min(cfg.steps, int(stop_after))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", unit="step")
    model.train()
    started, resumed_from = time.time(), step

    def save_state():
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "rng": _rng_state(gen), "history": history, "config": _config_key(cfg),
                    "seconds": seconds_before + time.time() - started}, state_path)

    try:
        while step < end:
            index = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
            batch = augment(data, index, cfg, model.input_size, model.normalization, gen, device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            use_part = cfg.part_loss_steps is None or step < cfg.part_loss_steps
            rotmat, betas, cam, extras = model.regress(batch.images)
            terms = model.training_losses(body, rotmat, betas, cam, extras, batch, weights=weights,
                                          use_part_loss=use_part, pelvis=data.pelvis)
            if not torch.isfinite(terms["total"]):
                raise RuntimeError(f"non-finite loss at step {step}: {({k: float(v) for k, v in terms.items()})}")
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            step += 1
            history.append({"step": step, **{k: round(float(v.detach()), 6) for k, v in terms.items()}})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(terms['total']):.4f}", **{k: f"{float(v):.3f}" for k, v in
                                                                        terms.items() if k != "total"})
            if step % cfg.save_every == 0 and step < end:
                save_state()
    except KeyboardInterrupt:
        save_state()
        raise UserError(f"interrupted at step {step}; continue with --resume (state in {state_path})") from None
    finally:
        if bar is not None:
            bar.close()
    save_state()
    if step < cfg.steps:
        return TrainResult(out, Path(str(out) + ".json"), step, history, history[0]["total"] if history else
                           math.nan, history[-1]["total"] if history else math.nan)
    model.eval()
    write_checkpoint(model, entry, out, half=cfg.half, step=step)
    sidecar = write_sidecar(cfg, data, history, out, seconds_before + time.time() - started, model,
                            options={**entry.options, **cfg.options}, resumed_from=resumed_from or None)
    return TrainResult(out, sidecar, step, history, history[0]["total"], history[-1]["total"])


def write_checkpoint(model, entry, path: Path, half: bool = False, step: int = 0) -> Path:
    """The model's state dict in its zoo entry's container (what load_model reads strictly)."""
    from occbench.checkpoints import save_state_dict

    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    container, prefix = CONTAINERS.get(entry.checkpoint_format, ("model-dict", ""))
    if container == "model-dict":
        torch.save({"model": state, "step": step}, path)
        return path
    return save_state_dict(state, path, container=container, prefix=prefix)


def _summary(history: list) -> dict:
    """Loss history summary: the mean of each term over the first and last 10 % of the steps, and a
    decimated curve of the total (at most 50 points)."""
    if not history:
        return {}
    k = max(1, len(history) // 10)
    keys = [key for key in history[0] if key != "step"]

    def mean(rows, key):
        vals = [r[key] for r in rows if key in r]
        return round(float(np.mean(vals)), 6) if vals else None

    stride = max(1, len(history) // 50)
    return {"first": {key: mean(history[:k], key) for key in keys},
            "last": {key: mean(history[-k:], key) for key in keys},
            "total_curve": [[r["step"], r["total"]] for r in history[::stride]]}


def write_sidecar(cfg: TrainConfig, data: TrainingSet, history: list, out: Path, seconds: float, model,
                  options: dict | None = None, resumed_from: int | None = None) -> Path:
    """Write FILE.json: how the checkpoint was trained. options: the full architecture options."""
    import occbench
    from occbench.assets import sha256_of

    synthetic = "synthetic" in data.provenance
    info = {
        "model": cfg.model, "options": cfg.options if options is None else options,
        "input_size": int(getattr(model, "input_size", 224)),
        "dataset": {"name": data.name, "source": cfg.dataset, "n_samples": len(data),
                    "part_labels": data.parts is not None, "pelvis": data.pelvis,
                    "provenance": data.provenance},
        "steps": len(history), "seed": cfg.seed, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "lr_schedule": cfg.lr_schedule,
        "optimizer": ("Adam (constant learning rate)" if cfg.lr_schedule == "constant" else
                      "Adam (learning rate: 2 % linear warm-up, cosine decay to 1 %)"),
        "loss_weights": {**DEFAULT_WEIGHTS, **cfg.loss_weights}, "part_loss_steps": cfg.part_loss_steps,
        "augmentation": {"enabled": cfg.augment, "scale_jitter": cfg.scale_jitter,
                         "translate_jitter": cfg.translate_jitter, "color_jitter": cfg.color_jitter,
                         "occluder_prob": cfg.occluder_prob},
        "init_checkpoint": cfg.init_checkpoint, "stored_dtype": "float16" if cfg.half else "float32",
        "losses": _summary(history), "train_seconds": round(seconds, 1) if math.isfinite(seconds) else None,
        "resumed_from_step": resumed_from,   # None: one uninterrupted session (resume reproduces it exactly)
        "occbench_version": occbench.__version__, "torch_version": torch.__version__,
        "checkpoint_sha256": sha256_of(out),
        "trained_on": (TRAINED_ON_SYNTHETIC if synthetic else
                       f"dataset {data.name!r} (see dataset.provenance); trained with occbench train, "
                       "not the published weights"),
    }
    init_sidecar = Path(str(cfg.init_checkpoint) + ".json") if cfg.init_checkpoint else None
    if init_sidecar is not None and init_sidecar.is_file():
        # a fine-tuning run records how its starting weights were trained (e.g. the demo's first phase)
        init = json.loads(init_sidecar.read_text())
        info["init_training"] = {k: init.get(k) for k in (
            "model", "options", "steps", "total_steps", "seed", "batch_size", "lr", "augmentation",
            "loss_weights", "part_loss_steps", "losses", "train_seconds", "checkpoint_sha256", "init_training")}
        info["init_training"]["dataset"] = (init.get("dataset") or {}).get("source")
        info["total_steps"] = len(history) + int(init.get("total_steps") or init.get("steps") or 0)
    else:
        info["total_steps"] = len(history)
    sidecar = Path(str(out) + ".json")
    sidecar.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return sidecar

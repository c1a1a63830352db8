"""Exact incremental inference for sliding-window occlusion on the zoo's ResNet trunks (Krypton-style).

A window changes a small box of the input; through each conv/pool layer that box grows by the layer's
receptive field. With the clean activations of a sample cached once, a window's activations are its cached
clean ones except inside the grown box, so only that box is recomputed (an input slice with its halo, read
from the cached clean map padded exactly as the layer pads, with the window's changed values laid over it).
Once the box covers most of a map, the remaining blocks and the model's head run normally. Reference:
Nakandala et al., "Incremental and Approximate Inference for Faster Occlusion-based Deep CNN Explanations",
SIGMOD 2019.

It lives with the models, not the engine, because it follows the layout of the zoo's ResNet trunks
(:mod:`occbench.models.backbones.resnet`) and each model's head (``regress_features`` /
``regress_trunk`` / ``regress_stages``); the engine only calls :class:`IncrementalRunner`.

Batching: the windows of one batch (possibly of several samples; ``samples`` says which cached sample each
row belongs to) share one box size per layer (the largest row's), each row at its own position, shifted
inside the map where it would cross a border. Rows whose image equals the clean one are recomputed at an
arbitrary position and stay exact.

Only fp32, eval mode (BatchNorm uses its running statistics, so it is a per-channel affine map).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from occbench.models.backbones.resnet import LAYERS, STAGE_NAMES, BasicBlock, Bottleneck

MIN_USEFUL_GAIN = 1.1
# windows/s with / without incremental inference (the faster memory format), CPU time, one thread,
# occsens40-dense, random weights: bench/bench_incremental.py (README, "Benchmarks"). A configuration measured
# below MIN_USEFUL_GAIN is run normally; one not listed here runs incrementally ("gain not measured").
MEASURED_GAIN = {
    "pare/resnet50/4/224/2x128": 1.74,   # batch 8 (2.17 at 16, 2.28 at 32); FLOP bound 1.77
    "pare/resnet18/3/96/2x128": 1.14,    # pare-demo, batch 16 (1.13-1.23 over runs; 1.27 at 32); bound 1.39
    "spin/resnet50/4/224": 1.93,         # SPIN and HMR-EFT, batch 8; FLOP bound 1.95
    "3dnbf-reg/resnet50/4/320": 1.05,    # batch 8; FLOP bound 1.12 (the UNet decoder changes everywhere)
}


# ----------------------------------------------------------------------------------------- support
@dataclass(frozen=True)
class Support:
    """Whether incremental inference applies to a model, and why (recorded in run.json)."""

    config: str            # model/trunk/stages/input size[/head], e.g. "pare/resnet50/4/224/2x128"
    supported: bool        # the layout is one this module can run exactly
    use: bool              # supported and not measured below MIN_USEFUL_GAIN
    measured_gain: float | None
    reason: str

    def as_dict(self) -> dict:
        return {"config": self.config, "supported": self.supported, "used": self.use,
                "measured_gain": self.measured_gain, "reason": self.reason}


def _plan(model: nn.Module):
    """(config, trunk module, stage names the tail needs, tail) or a reason string when unsupported."""
    from occbench.models.nbf import NBFRegressor
    from occbench.models.pare import PARE
    from occbench.models.spin import HMRRegressor

    size = int(getattr(model, "input_size", 0))
    if type(model) is PARE:
        if not model.backbone_name.startswith("resnet"):
            return f"pare with the {model.backbone_name} backbone (only ResNet trunks are supported)"
        trunk = model.backbone
        last = STAGE_NAMES[model.backbone_stages - 1]
        return (f"pare/resnet{trunk.depth}/{model.backbone_stages}/{size}/{model.head_name}", trunk, (last,),
                partial(_on_stage, model.regress_features, last))
    if type(model) is HMRRegressor:
        stages = [n for n in STAGE_NAMES if n in model._modules]
        return (f"spin/resnet{_depth(model)}/{len(stages)}/{size}", model, (stages[-1],),
                partial(_on_stage, model.regress_trunk, stages[-1]))
    if type(model) is NBFRegressor:
        return (f"3dnbf-reg/resnet50/4/{size}", model.backbone, STAGE_NAMES, model.regress_stages)
    return f"{type(model).__name__} is not a ResNet model of the zoo (supported: pare with a ResNet " \
           f"backbone, spin, hmr-eft, 3dnbf-reg)"


def _on_stage(regress, stage: str, stages: dict):
    return regress(stages[stage])


def _depth(trunk: nn.Module) -> int:
    blocks = [len(getattr(trunk, n)) for n in STAGE_NAMES if n in trunk._modules]
    bottleneck = isinstance(trunk.layer1[0], Bottleneck)
    for depth, (kind, counts) in LAYERS.items():
        if (kind == "bottleneck") == bottleneck and list(counts[:len(blocks)]) == blocks:
            return depth
    return 0


def supports_incremental(model: nn.Module, precision: str = "fp32") -> Support:
    """Whether ``run --incremental`` can run ``model`` (its layout, eval mode, fp32) and is worth it there."""
    plan = _plan(model)
    if isinstance(plan, str):
        return Support("", False, False, None, plan)
    config = plan[0]
    if model.training:
        return Support(config, False, False, None, "the model is in training mode (BatchNorm must use its "
                                                   "running statistics): call model.eval()")
    if precision != "fp32":
        return Support(config, False, False, None, f"precision {precision} (incremental inference is fp32 only)")
    gain = MEASURED_GAIN.get(config)
    if gain is not None and gain < MIN_USEFUL_GAIN:
        return Support(config, True, False, gain,
                       f"measured gain {gain:.2f}x < {MIN_USEFUL_GAIN}x: run normally")
    reason = "gain not measured for this configuration" if gain is None else f"measured gain {gain:.2f}x"
    return Support(config, True, True, gain, reason)


# ----------------------------------------------------------------------------------------- cache
@dataclass
class _Cached:
    """A clean activation of every cached sample, channels last and padded: (S, H+2p, W+2p, C)."""

    tensor: torch.Tensor
    pad: int
    height: int
    width: int


def _cache_point(x: torch.Tensor, pad: int, value: float = 0.0) -> _Cached:
    padded = F.pad(x, [pad] * 4, value=value) if pad else x
    return _Cached(padded.permute(0, 2, 3, 1).contiguous(), pad, x.shape[2], x.shape[3])


@dataclass
class CleanCache:
    """Clean activations of a set of samples (rows of ``samples`` in :meth:`IncrementalRunner.regress`)."""

    points: dict
    count: int


# ----------------------------------------------------------------------------------------- regions
@dataclass
class _Region:
    """Values of an activation inside one box per row: patch (B,C,h,w), box top-left (y0, x0) per row.
    Outside its box, row b equals the cached clean activation of its sample."""

    patch: torch.Tensor
    y0: np.ndarray
    x0: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return self.patch.shape[2], self.patch.shape[3]


def _read(cached: _Cached, region: _Region, samples: list, y0: np.ndarray, x0: np.ndarray,
          h: int, w: int) -> torch.Tensor:
    """Row b's activation on [y0_b, y0_b+h) x [x0_b, x0_b+w) (may reach ``cached.pad`` into the padding):
    (B,C,h,w) channels last, the clean cache with the region's values laid over it."""
    if (h, w) == region.size and np.array_equal(y0, region.y0) and np.array_equal(x0, region.x0):
        return region.patch
    p, t = cached.pad, cached.tensor
    # slices and a stack: plain memory copies (advanced indexing computes an offset per element)
    out = torch.stack([t[s, y + p:y + p + h, x + p:x + p + w] for s, y, x in zip(samples, y0.tolist(), x0.tolist())])
    out = out.permute(0, 3, 1, 2)
    ph, pw = region.size
    top, left = np.maximum(region.y0, y0), np.maximum(region.x0, x0)       # overlap of the two boxes
    bottom, right = np.minimum(region.y0 + ph, y0 + h), np.minimum(region.x0 + pw, x0 + w)
    spans = np.stack([top - y0, bottom - y0, left - x0, right - x0, top - region.y0, left - region.x0], 1)
    if (spans == spans[0]).all():                                        # the same overlap in every row
        oy0, oy1, ox0, ox1, py, px = spans[0].tolist()
        if oy1 > oy0 and ox1 > ox0:
            out[:, :, oy0:oy1, ox0:ox1] = region.patch[:, :, py:py + oy1 - oy0, px:px + ox1 - ox0]
        return out
    for b, (oy0, oy1, ox0, ox1, py, px) in enumerate(spans.tolist()):
        if oy1 > oy0 and ox1 > ox0:
            out[b, :, oy0:oy1, ox0:ox1] = region.patch[b, :, py:py + oy1 - oy0, px:px + ox1 - ox0]
    return out


def _grow(y0: np.ndarray, y1: np.ndarray, kernel: int, stride: int, pad: int, dilation: int, out_size: int):
    """Output rows [o0, o1) whose receptive field meets input rows [y0, y1), one common size, shifted inside
    the map; returns (o0 per row, size)."""
    reach = dilation * (kernel - 1)
    o0 = np.clip(-((reach - y0 - pad) // stride), 0, out_size)    # ceil((y0 + pad - reach) / stride)
    o1 = np.clip((y1 - 1 + pad) // stride + 1, 0, out_size)
    size = max(int((o1 - o0).max()), 1)
    return np.clip(o0, 0, out_size - size), size


def _pair(v) -> int:
    a, b = (v, v) if isinstance(v, int) else v
    if a != b:
        raise ValueError(f"non-square kernel geometry {v} is not supported")
    return a


class IncrementalRunner:
    """Runs a supported zoo model on occluded copies of cached clean images, recomputing only what changed.

    ``cache(clean)`` once for a set of samples (RGB [0,1] at the model's input size), then
    ``regress(cache, samples, images)`` for batches of occluded copies (``samples[b]``: the cached sample of
    row b) returns what ``model.regress(model.preprocess(images))`` returns, within fp32 rounding.

    full_fraction: a block whose changed box covers at least this share of its input map runs normally,
    with every later block.
    """

    def __init__(self, model: nn.Module, full_fraction: float = 0.6, cache_samples: int = 4) -> None:
        plan = _plan(model)
        if isinstance(plan, str):
            raise ValueError(plan)
        if model.training:
            raise ValueError("incremental inference needs the model in eval mode (BatchNorm running statistics)")
        self.model = model
        self.config, self.trunk, self.stages, self.tail = plan
        self.full_fraction = full_fraction
        self.cache_samples = cache_samples
        self._held = None                 # (clean tensor, first slot, end slot, CleanCache) of regress_windows
        self.macs: dict | None = None     # module name -> multiply-adds of the incremental convs, when a dict

    # ------------------------------------------------------------------------------------- clean pass
    def cache(self, clean: torch.Tensor) -> CleanCache:
        """clean: (S,3,size,size) RGB [0,1] at the model's input size."""
        t = self.trunk
        points = {}
        x = self.model.preprocess(clean)
        points["image"] = _cache_point(x, _pair(t.conv1.padding))
        x = t.relu(t.bn1(t.conv1(x)))
        points["stem.relu"] = _cache_point(x, _pair(t.maxpool.padding), float("-inf"))
        x = t.maxpool(x)
        for stage in STAGE_NAMES:
            if stage not in t._modules:
                break
            for i, block in enumerate(getattr(t, stage)):
                x = self._cache_block(block, f"{stage}.{i}", x, points)
            if stage in self.stages:
                points[f"{stage}.out"] = _cache_point(x, 0)
        return CleanCache(points, clean.shape[0])

    @staticmethod
    def _cache_block(block: nn.Module, name: str, x: torch.Tensor, points: dict) -> torch.Tensor:
        points[f"{name}.in"] = _cache_point(x, _pair(block.conv1.padding))
        ident = x if block.downsample is None else block.downsample(x)
        if block.downsample is not None:
            points[f"{name}.ident"] = _cache_point(ident, 0)
        t = block.relu(block.bn1(block.conv1(x)))
        points[f"{name}.t1"] = _cache_point(t, _pair(block.conv2.padding))
        if isinstance(block, Bottleneck):
            t = block.relu(block.bn2(block.conv2(t)))
            points[f"{name}.t2"] = _cache_point(t, 0)
            main = block.bn3(block.conv3(t))
        else:
            main = block.bn2(block.conv2(t))
        points[f"{name}.main"] = _cache_point(main, 0)
        return block.relu(main + ident)

    # ------------------------------------------------------------------------------------- windows
    def changed_region(self, cache: CleanCache, samples: torch.Tensor, images: torch.Tensor):
        """Normalized images (as a region covering the whole image), and the end (y1, x1) of the box of
        pixels that differ from their sample's clean image, which starts at the region's (y0, x0)."""
        x = self.model.preprocess(images)
        image = cache.points["image"]
        p = image.pad
        clean = image.tensor[samples, p:p + image.height, p:p + image.width].permute(0, 3, 1, 2)
        differs = (x != clean).any(1)                                        # (B,H,W)
        y0, y1 = _span(differs.any(2))
        x0, x1 = _span(differs.any(1))
        return _Region(x, y0, x0), y1, x1

    def regress(self, cache: CleanCache, samples, images: torch.Tensor):
        """samples: (B,) index of each row's cached sample; images: (B,3,size,size) RGB [0,1]."""
        samples = torch.as_tensor(samples, dtype=torch.long, device=images.device)
        region, y1, x1 = self.changed_region(cache, samples, images)
        samples = samples.tolist()
        h, w = max(int((y1 - region.y0).max()), 1), max(int((x1 - region.x0).max()), 1)
        size = images.shape[2:]
        y0 = np.clip(region.y0, 0, size[0] - h)
        x0 = np.clip(region.x0, 0, size[1] - w)
        patch = torch.stack([x[:, y:y + h, c:c + w] for x, y, c in zip(region.patch, y0.tolist(), x0.tolist())])
        patch = patch.contiguous(memory_format=torch.channels_last)
        return self.tail(self._trunk(cache, samples, _Region(patch, y0, x0)))

    def regress_windows(self, clean: torch.Tensor, slots, images: torch.Tensor):
        """Like :meth:`regress` for rows of ``clean`` (S,3,size,size): row b of ``images`` is an occluded copy
        of ``clean[slots[b]]``. Caches ``cache_samples`` consecutive samples at a time (the engine's batches
        walk the samples in order), so memory stays bounded for large chunks."""
        slots = np.asarray(slots, dtype=np.int64)
        low, high = int(slots.min()), int(slots.max()) + 1
        held = self._held
        if held is None or held[0] is not clean or low < held[1] or high > held[2]:
            end = min(len(clean), max(high, low + self.cache_samples))
            self._held = held = (clean, low, end, self.cache(clean[low:end]))
        return self.regress(held[3], slots - held[1], images)

    def release(self) -> None:
        """Drop the cache held by :meth:`regress_windows`."""
        self._held = None

    def _trunk(self, cache: CleanCache, samples: list, region: _Region) -> dict:
        t, points = self.trunk, cache.points
        region = self._conv(t.conv1, region, points["image"], samples)
        region = _Region(t.relu(t.bn1(region.patch)), region.y0, region.x0)
        region = self._pool(t.maxpool, region, points["stem.relu"], samples)
        full, stages = None, {}
        for stage in STAGE_NAMES:
            if stage not in t._modules:
                break
            for i, block in enumerate(getattr(t, stage)):
                name = f"{stage}.{i}"
                if full is None:
                    cached = points[f"{name}.in"]
                    h, w = region.size
                    if h * w >= self.full_fraction * cached.height * cached.width:
                        full = self._materialize(region, cached, samples)
                if full is not None:
                    full = block(full)
                else:
                    region = self._block(block, name, region, points, samples)
            if stage in self.stages:
                stages[stage] = full if full is not None else \
                    self._materialize(region, points[f"{stage}.out"], samples)
        return stages

    def _block(self, block, name: str, x: _Region, points: dict, samples) -> _Region:
        cached_in = points[f"{name}.in"]
        t = self._conv(block.conv1, x, cached_in, samples)
        t = _Region(block.relu(block.bn1(t.patch)), t.y0, t.x0)
        if isinstance(block, Bottleneck):
            t = self._conv(block.conv2, t, points[f"{name}.t1"], samples)
            t = _Region(block.relu(block.bn2(t.patch)), t.y0, t.x0)
            main = self._conv(block.conv3, t, points[f"{name}.t2"], samples)
            main = _Region(block.bn3(main.patch), main.y0, main.x0)
        elif isinstance(block, BasicBlock):
            main = self._conv(block.conv2, t, points[f"{name}.t1"], samples)
            main = _Region(block.bn2(main.patch), main.y0, main.x0)
        else:
            raise TypeError(f"{type(block).__name__} is not a ResNet block")
        if block.downsample is None:
            ident, cached_ident = x, cached_in
        else:
            conv, bn = block.downsample[0], block.downsample[1]
            ident = self._conv(conv, x, cached_in, samples)
            ident = _Region(bn(ident.patch), ident.y0, ident.x0)
            cached_ident = points[f"{name}.ident"]
        # the sum on the union of both boxes (the main path's box already holds the identity's in practice)
        cached_main = points[f"{name}.main"]
        y0, h = _union(main.y0, main.size[0], ident.y0, ident.size[0], cached_main.height)
        x0, w = _union(main.x0, main.size[1], ident.x0, ident.size[1], cached_main.width)
        total = _read(cached_main, main, samples, y0, x0, h, w) + _read(cached_ident, ident, samples, y0, x0, h, w)
        return _Region(torch.relu_(total), y0, x0)

    def _conv(self, conv: nn.Conv2d, region: _Region, cached: _Cached, samples) -> _Region:
        k, s, p, d = (_pair(v) for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding mode {conv.padding_mode!r} is not supported")
        out_h = (cached.height + 2 * p - d * (k - 1) - 1) // s + 1
        out_w = (cached.width + 2 * p - d * (k - 1) - 1) // s + 1
        (h, w), reach = region.size, d * (k - 1)
        oy0, oh = _grow(region.y0, region.y0 + h, k, s, p, d, out_h)
        ox0, ow = _grow(region.x0, region.x0 + w, k, s, p, d, out_w)
        x = _read(cached, region, samples, oy0 * s - p, ox0 * s - p, (oh - 1) * s + reach + 1,
                  (ow - 1) * s + reach + 1)
        out = F.conv2d(x, conv.weight, conv.bias, stride=s, padding=0, dilation=d, groups=conv.groups)
        if self.macs is not None:
            name = next(n for n, m in self.model.named_modules() if m is conv)
            self.macs[name] = self.macs.get(name, 0) + out.numel() * x.shape[1] // conv.groups * k * k
        return _Region(out, oy0, ox0)

    @staticmethod
    def _pool(pool: nn.MaxPool2d, region: _Region, cached: _Cached, samples) -> _Region:
        k, s, p, d = (_pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
        if pool.ceil_mode:
            raise ValueError("max-pool ceil_mode is not supported")
        out_h = (cached.height + 2 * p - d * (k - 1) - 1) // s + 1
        out_w = (cached.width + 2 * p - d * (k - 1) - 1) // s + 1
        h, w = region.size
        oy0, oh = _grow(region.y0, region.y0 + h, k, s, p, d, out_h)
        ox0, ow = _grow(region.x0, region.x0 + w, k, s, p, d, out_w)
        x = _read(cached, region, samples, oy0 * s - p, ox0 * s - p, (oh - 1) * s + d * (k - 1) + 1,
                  (ow - 1) * s + d * (k - 1) + 1)
        return _Region(F.max_pool2d(x, k, s, 0, d), oy0, ox0)

    @staticmethod
    def _materialize(region: _Region, cached: _Cached, samples) -> torch.Tensor:
        """The full activation (B,C,H,W): the clean map of each row's sample with its box laid over it."""
        zeros = np.zeros(len(region.y0), np.int64)
        full = _read(cached, region, samples, zeros, zeros, cached.height, cached.width)
        return full.contiguous(memory_format=torch.channels_last)   # the later blocks run channels last


def _union(a0: np.ndarray, a_size: int, b0: np.ndarray, b_size: int, limit: int):
    lo = np.minimum(a0, b0)
    hi = np.maximum(a0 + a_size, b0 + b_size)
    size = int((hi - lo).max())
    return np.clip(lo, 0, limit - size), size


def _span(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(B,N) bool -> first index and one past the last True index per row (0, 0 for a row without any)."""
    n = mask.shape[1]
    any_ = mask.any(1)
    first = torch.where(any_, mask.int().argmax(1), 0)
    last = torch.where(any_, n - mask.flip(1).int().argmax(1), 0)
    return first.cpu().numpy().astype(np.int64), last.cpu().numpy().astype(np.int64)


def unused_warning(support: Support) -> str | None:
    """The line to print when ``--incremental`` was asked for and does nothing, else None."""
    if support.use:
        return None
    return f"--incremental does nothing for {support.config or 'this model'}: {support.reason}"

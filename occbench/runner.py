"""Fast model execution: a zoo model on batches of crops in a chosen precision and memory format.

The batch size and memory format are measured (:func:`autotune`) rather than assumed.

Inference runs under ``torch.inference_mode`` in channels-last or contiguous memory format with optional
autocast (``precision`` bf16 / fp16: the regressor runs in low precision, the body model in fp32).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from occbench.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass
class Runner:
    """Runs a zoo model on batches of RGB [0,1] crops at its input size; returns fp32 joints.

    Calls :meth:`ZooModel.predict` with the precision's autocast dtype (the regressor in low precision, the
    body model in fp32). A model with ``needs_grad`` (test-time fitting) is run under ``torch.no_grad``
    instead of ``inference_mode``, so it may enable gradients inside.
    """

    model: torch.nn.Module
    precision: str = "fp32"
    memory_format: str = "contiguous"
    forward_seconds: float = 0.0      # host time inside forward calls (exact on CPU; launch time on CUDA)
    last: object = None               # the last call's Prediction without extras (params, vertices for PVE)

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
        return torch.no_grad() if self.model.needs_grad else torch.inference_mode()

    def __call__(self, images: torch.Tensor):
        """images: (B,3,S,S) RGB [0,1] at the model's input size -> (joints_lsp (B,14,3), joints_h36m root
        (B,3), joints2d (B,14,2)) fp32, body frame (pelvis not subtracted)."""
        start = time.perf_counter()
        try:
            images = images.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])
            pred = self.model.predict(images, autocast_dtype=PRECISIONS[self.precision])
            # extras (feature maps, attention) are not kept: they would stay alive into the next batch
            self.last = dataclasses.replace(pred, extras={})
            return pred.joints_lsp.float(), pred.joints_h36m[:, 0].float(), pred.joints2d.float()
        finally:
            self.forward_seconds += time.perf_counter() - start


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

"""Throughput and peak memory of ``ZooModel.predict`` for every zoo model that can be built.

    python bench/bench_predict.py                       # all zoo models, batch 1 and 32, CPU
    python bench/bench_predict.py --models pare spin --batch-sizes 1 32 --json out.json

Weights are random (``weights="random"``): speed and memory do not depend on weight values. ``predict``
includes everything a protocol pays per batch: resize/normalisation, the network, the SMPL body model
(the stand-in body when no SMPL folder is configured; it has the real SMPL sizes) and the 2D projection.

Timing: one warm-up call, then repeated calls until ``--min-seconds`` have passed (at least
``--min-repeats``); images/s = batch * calls / elapsed wall time, under ``torch.inference_mode``.

Peak memory:
- CPU: peak resident set size during the warm-up and timed calls minus the resident size just before them
  (the model's weights are not counted), read from
  /proc/self/status (VmHWM / VmRSS) after resetting the high-water mark with ``echo 5 >
  /proc/self/clear_refs`` (Linux >= 4.0). This counts every allocation the process touches (torch's CPU
  allocator, oneDNN scratch, the body model's temporaries), which tracemalloc does not see. Where the reset is
  not allowed, the figure is the ``resource.getrusage`` max-RSS delta, a lower bound, and is marked "(lb)".
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated
  before the calls.
Model configurations: every entry of ``occbench.models.model_names()`` with its default options, plus
PARE's ResNet-50 heads; entries whose builder module does not exist yet are listed as skipped. Each
(model, batch) runs in its own interpreter (see :func:`run_worker`); a failing port is reported, not fatal.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

EXTRA_CONFIGS = {"pare": [{"backbone": "resnet50", "head": "2x128"}, {"backbone": "resnet50", "head": "3x256"}]}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak memory (MiB) allocated inside it; see the module docstring."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None
        self.lower_bound = False

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self.lower_bound = not _reset_peak_rss()
            self._start = _status_kib("VmRSS") or 0
            self._start_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2 ** 20
        elif not self.lower_bound and _status_kib("VmHWM") is not None:
            self.mib = (_status_kib("VmHWM") - self._start) / 1024
        else:
            self.mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._start_maxrss) / 1024
        return False


def configurations(names: list[str] | None):
    """Yield (model name, options, skip reason or None) for the zoo entries asked for."""
    from occbench.models import get_entry, model_names

    for name in names or model_names():
        entry = get_entry(name)
        module = entry.builder.split(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        reason = None if found else f"module {module} does not exist yet"
        yield name, {}, reason
        for options in EXTRA_CONFIGS.get(name, []):
            yield name, options, reason


def bench_one(name: str, options: dict, batch_sizes: list[int], device: torch.device, min_seconds: float,
              min_repeats: int, seed: int = 0) -> list[dict]:
    from occbench.zoo import load_model

    model = load_model(name, device=device, weights="random", seed=seed, **options)
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for batch in batch_sizes:
        crops = torch.rand(batch, 3, 224, 224, generator=generator).to(device)
        with torch.inference_mode(), PeakMemory(device) as memory:
            # the warm-up call (allocator pools, oneDNN kernels) is inside the memory window, outside timing
            model.predict(crops)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            calls = 0
            start = time.perf_counter()
            while calls < min_repeats or time.perf_counter() - start < min_seconds:
                model.predict(crops)
                calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
        rows.append({"model": name, "options": options, "batch": batch, "calls": calls,
                     "seconds_per_call": elapsed / calls, "images_per_s": batch * calls / elapsed,
                     "peak_mib": memory.mib, "peak_is_lower_bound": memory.lower_bound})
    del model
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_worker(name: str, options: dict, batch: int, args) -> dict:
    """Bench one (model, batch) in a fresh interpreter, so that memory freed by an earlier configuration
    (kept by the allocator) cannot hide this one's peak. Returns the row, or a row with "failed"."""
    command = [sys.executable, __file__, "--worker", json.dumps({"model": name, "options": options,
                                                                   "batch": batch}),
               "--device", args.device, "--min-seconds", str(args.min_seconds),
               "--min-repeats", str(args.min_repeats)] + (["--threads", str(args.threads)] if args.threads else [])
    done = subprocess.run(command, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "options": options, "batch": batch, "failed": tail}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", help="zoo names (default: all)")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--min-repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows and the machine description here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        job = json.loads(args.worker)
        row = bench_one(job["model"], job["options"], [job["batch"]], device, args.min_seconds,
                        args.min_repeats)[0]
        print(json.dumps(row))
        return 0
    machine = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
               "threads": torch.get_num_threads(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
               "load_average_at_start": os.getloadavg(),
               "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(f"# predict benchmark: {machine}")
    print(f"{'model':34s} {'batch':>5s} {'images/s':>10s} {'s/call':>8s} {'peak MiB':>10s}")
    rows = []
    for name, options, skip in configurations(args.models):
        label = name + ("" if not options else " " + ",".join(f"{k}={v}" for k, v in options.items()))
        if skip:
            print(f"{label:34s} skipped: {skip}")
            rows.append({"model": name, "options": options, "skipped": skip})
            continue
        for batch in args.batch_sizes:
            row = run_worker(name, options, batch, args)
            rows.append(row)
            if "failed" in row:
                print(f"{label:34s} {batch:5d} failed: {row['failed']}", flush=True)
                continue
            mark = " (lb)" if row["peak_is_lower_bound"] else ""
            print(f"{label:34s} {row['batch']:5d} {row['images_per_s']:10.2f} {row['seconds_per_call']:8.3f} "
                  f"{row['peak_mib']:10.1f}{mark}", flush=True)
    machine["load_average_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

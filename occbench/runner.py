"""Fast model execution: a zoo model on batches of crops, and every choice about how it runs (batch size,
memory format, threads, precision) made so that the same command gives the same numbers.

Inference runs under ``torch.inference_mode`` in channels-last or contiguous memory format with optional
autocast (``precision`` bf16 / fp16: the regressor runs in low precision, the body model in fp32).

Why nothing that can change a number is chosen by timing: on CPU in fp32 the kernels' summation order depends
on the batch size (batches below 16 differ from larger ones in the last bits on this machine's oneDNN), on the
thread count and on the memory format, by up to ~1e-3 mm. So :func:`plan_execution` takes fixed, documented
defaults per device, reuses what a resumed run recorded, and measures only on explicit request
(``--batch-size auto``), caching and recording the choice.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from occbench.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# Fixed defaults per device type. CPU: batch 32 runs pare-demo at its plateau (16-64 within a few %) and keeps a
# ResNet-50 batch at 224 px under 1 GB; channels-last measured 1.26x (pare-demo) and 1.36x (PARE-R50) the
# images per CPU second of contiguous on this machine (one thread, oneDNN), and is what GPUs prefer.
DEFAULT_BATCH = {"cpu": 32, "cuda": 64}
DEFAULT_MEMORY_FORMAT = {"cpu": "channels_last", "cuda": "channels_last"}
MIN_TUNED_BATCH = {"cpu": 8, "cuda": 1}      # below 8 a CPU batch only adds per-call overhead
TUNE_BUDGET_S = 2.0                          # most seconds (CPU time on CPU) one tuning may spend


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
    incremental: object = None        # an occbench.models.incremental.IncrementalRunner (--incremental)

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

    def __call__(self, images: torch.Tensor, clean: torch.Tensor | None = None, slots=None):
        """images: (B,3,S,S) RGB [0,1] at the model's input size -> (joints_lsp (B,14,3), joints_h36m root
        (B,3), joints2d (B,14,2)) fp32, body frame (pelvis not subtracted).

        With ``clean`` (the clean crops), ``slots`` (row b is an occluded copy of ``clean[slots[b]]``) and an
        ``incremental`` runner, only what the occluder changes is recomputed (exact up to fp32 rounding)."""
        start = time.perf_counter()
        try:
            if self.incremental is not None and clean is not None:
                rotmat, betas, cam, _ = self.incremental.regress_windows(clean, slots, images)
                pred = self.model.prediction_from_params(rotmat, betas, cam, {})
                self.last = pred
                return pred.joints_lsp.float(), pred.joints_h36m[:, 0].float(), pred.joints2d.float()
            images = images.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])
            pred = self.model.predict(images, autocast_dtype=PRECISIONS[self.precision])
            # extras (feature maps, attention) are not kept: they would stay alive into the next batch
            self.last = dataclasses.replace(pred, extras={})
            return pred.joints_lsp.float(), pred.joints_h36m[:, 0].float(), pred.joints2d.float()
        finally:
            self.forward_seconds += time.perf_counter() - start


# ------------------------------------------------------------------------------------------ planning
@dataclass
class Execution:
    """How a run executes; every field is recorded in run.json and reused on resume."""

    batch_size: int
    memory_format: str
    threads: int
    precision: str                        # the precision used (may differ from the one asked for)
    batch_rule: str                       # "given", "default", "resumed", "autotune" or "autotune-cached"
    precision_check: dict | None = None   # low precision: hardware support, measured speed vs fp32, decision
    autotune: dict | None = None          # --batch-size auto: the measurements or the cache entry

    def record(self) -> dict:
        return asdict(self)


def default_threads(workers: int = 1) -> int:
    """The thread count a run uses unless told (``--threads``): OMP_NUM_THREADS when set, else the CPUs this
    process may use (its affinity, at most torch's own default, the physical cores), shared evenly by
    ``workers`` processes on one machine (one thread each when there are as many workers as CPUs).
    It depends on the machine, never on its load, so reruns on one machine use the same count."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        cpus = int(env)
    else:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cpus = max(1, min(available, torch.get_num_threads()))
    return max(1, cpus // max(1, int(workers)))


def parse_batch_size(value) -> int | str | None:
    """``--batch-size`` as typed: None (the device's default), an integer >= 1, or "auto" (measured, cached)."""
    if value is None or value == "auto" or isinstance(value, int):
        if isinstance(value, int) and (isinstance(value, bool) or value < 1):
            raise UserError(f"--batch-size {value}: must be an integer >= 1, or auto (measured on this machine)")
        return value
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--batch-size {value}: must be an integer >= 1, or auto (measured on this machine)")
    return int(text)


def plan_execution(runner: Runner, input_size: int, *, batch_size=None, memory_format: str = "auto",
                   threads: int | None = None, recorded: dict | None = None, model_key: str = "model",
                   max_batch: int = 64, cpu_flags: set | None = None) -> Execution:
    """Decide batch size, memory format, threads and precision for ``runner`` and apply them.

    Nothing here that can change a number depends on timing unless asked: batch size and memory format take
    the device's fixed defaults (:data:`DEFAULT_BATCH`, :data:`DEFAULT_MEMORY_FORMAT`), threads
    :func:`default_threads`, precision the hardware's native support (:func:`decide_precision`). A resumed run
    (``recorded``: its run.json) reuses what it recorded. ``batch_size="auto"`` measures (:func:`autotune`) and
    caches the choice per model, input size, device, precision, threads and memory format.
    """
    device = runner.device
    recorded = recorded or {}
    batch_size = parse_batch_size(batch_size)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"--threads {threads!r}: give a positive integer (default: {default_threads()})")
    if recorded.get("threads") and threads and threads != recorded["threads"]:
        raise UserError(f"--threads {threads}: this run directory was made with {recorded['threads']} threads "
                        "and resuming with another count would change the last bits of its numbers; "
                        f"pass --threads {recorded['threads']} or another --out")
    threads = threads or recorded.get("threads") or default_threads()
    torch.set_num_threads(int(threads))
    if memory_format == "auto":
        memory_format = recorded.get("memory_format") or DEFAULT_MEMORY_FORMAT.get(device.type, "contiguous")
    runner.set_memory_format(memory_format)

    requested = runner.precision
    check = None
    if requested != "fp32":
        used, check = check_precision(runner, input_size, requested, cpu_flags=cpu_flags)
        runner.precision = used

    tuned, rule = None, "given"
    if batch_size in (None, "auto") and recorded.get("batch_size"):
        batch_size, rule = int(recorded["batch_size"]), "resumed"
    elif batch_size is None:
        batch_size, rule = min(DEFAULT_BATCH.get(device.type, 32), max(1, max_batch)), "default"
    elif batch_size == "auto":
        key = tune_key(model_key, input_size, device, runner.precision, threads, memory_format)
        tuned = cached_autotune(runner, input_size, key, max_batch=max_batch)
        batch_size, rule = tuned["batch_size"], "autotune-cached" if tuned.get("cached") else "autotune"
    return Execution(batch_size=int(batch_size), memory_format=memory_format, threads=int(threads),
                     precision=runner.precision, batch_rule=rule, precision_check=check, autotune=tuned)


# ------------------------------------------------------------------------------------------ precision
def cpu_flags() -> set:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Flags that give a CPU native low-precision matrix units; without them oneDNN emulates bf16 / fp16 (measured
# 20x slower than fp32 for PARE-HRNet on an AMD EPYC without AVX-512).
NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def decide_precision(requested: str, device_type: str, flags: set, cuda_bf16: bool = True) -> tuple[str, str]:
    """(precision to use, reason): fp32 instead of a low precision the hardware does not run natively.

    Decided from the hardware alone (never from a timing), so the same machine always decides the same.
    """
    if requested == "fp32":
        return "fp32", "fp32 asked"
    if device_type == "cuda":
        if requested == "bf16" and not cuda_bf16:
            return "fp32", "this GPU has no bf16 support"
        return requested, f"{requested} on CUDA"
    native = [f for f in NATIVE_CPU_FLAGS[requested] if f in flags]
    if native:
        return requested, f"native {requested} on this CPU ({', '.join(native)})"
    return "fp32", (f"this CPU has no native {requested} ({' / '.join(NATIVE_CPU_FLAGS[requested])} missing): "
                    f"{requested} would be emulated")


def check_precision(runner: Runner, input_size: int, requested: str, cpu_flags: set | None = None,
                    speed_ratio: float | None = None) -> tuple[str, dict]:
    """Decide the precision (:func:`decide_precision`), time one batch in it against fp32 for the record, and
    warn when it falls back or is measured slower than fp32. ``cpu_flags`` / ``speed_ratio`` (low precision
    images/s over fp32 images/s) may be given instead of read and measured."""
    device = runner.device
    flags = globals()["cpu_flags"]() if cpu_flags is None else set(cpu_flags)
    cuda_bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    used, reason = decide_precision(requested, device.type, flags, cuda_bf16)
    if speed_ratio is None:
        speed_ratio = _measure_speed_ratio(runner, input_size, requested)
    record = {"requested": requested, "used": used, "reason": reason,
              "speed_vs_fp32": round(float(speed_ratio), 3),
              "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if used != requested:
        warnings.warn(f"--precision {requested}: {reason}; measured {speed_ratio:.2f}x the speed of fp32 here, "
                      "so this run uses fp32 (recorded in run.json as precision_check)", stacklevel=2)
    elif speed_ratio < 1.0:
        warnings.warn(f"--precision {requested}: measured {speed_ratio:.2f}x the speed of fp32 on this model "
                      f"and device ({reason}); fp32 would be faster", stacklevel=2)
    return used, record


def _measure_speed_ratio(runner: Runner, input_size: int, precision: str, batch: int = 8) -> float:
    """Low-precision images/s over fp32 images/s for one batch (best of two calls each, after a warm-up)."""
    images = torch.rand(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    images = images.to(runner.device)
    clock = _clock(runner.device)
    seconds = {}
    saved = runner.precision
    try:
        for name in ("fp32", precision):
            runner.precision = name
            seconds[name] = _seconds_per_call(runner, images, clock, calls=2)
    finally:
        runner.precision = saved
    return seconds["fp32"] / max(seconds[precision], 1e-12)


# ------------------------------------------------------------------------------------------ autotune
def _clock(device: torch.device):
    """CPU: this process's CPU time, which other processes' load does not inflate (wall time under load
    picked batch 2 once, 50x slower than batch 32); CUDA: wall time (the work is on the GPU)."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def tune_key(model_key: str, input_size: int, device: torch.device, precision: str, threads: int,
             memory_format: str) -> str:
    from occbench.provenance import device_name
    name = device_name(device).split(",")[0] if device.type == "cpu" else device_name(device)
    return "|".join([model_key, str(input_size), device.type, name, precision, f"{threads}t", memory_format,
                     f"torch {torch.__version__}"])


def autotune_cache_path() -> Path:
    from occbench.assets import cache_dir
    return cache_dir() / "autotune.json"


def cached_autotune(runner: Runner, input_size: int, key: str, max_batch: int = 64) -> dict:
    """:func:`autotune`, or the choice cached under ``key`` by an earlier run (``cached: True``)."""
    path = autotune_cache_path()
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}                       # a damaged cache is only a lost measurement
    entry = cache.get(key)
    if entry and entry.get("batch_size", 0) <= max_batch:
        return {**entry, "key": key, "cached": True, "cache": str(path)}
    tuned = autotune(runner, input_size, max_batch=max_batch)
    cache[key] = tuned
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return {**tuned, "key": key, "cached": False, "cache": str(path)}


def autotune(runner: Runner, input_size: int, max_batch: int = 64, min_batch: int | None = None,
             budget_s: float = TUNE_BUDGET_S, tolerance: float = 0.9, clock=None) -> dict:
    """Measure images per second at batch sizes min_batch, 2*min_batch, ... up to ``max_batch`` in the
    runner's memory format and precision; pick the largest batch within ``tolerance`` of the fastest.

    Each size costs a warm-up call and one timed call. On CPU the clock is the process's CPU time
    (:func:`_clock`) and the smallest batch is 8; the tuning stops after ``budget_s`` of that clock (at least
    one size is measured). Returns {"batch_size", "measurements":
    [{batch, images_per_s}, ...], "clock", "tuning_s"}.
    """
    device = runner.device
    clock = clock or _clock(device)
    batch = max(1, min(max_batch, min_batch or MIN_TUNED_BATCH.get(device.type, 1)))
    generator = torch.Generator().manual_seed(0)
    results, started = [], clock()
    while batch <= max_batch:
        images = torch.rand(batch, 3, input_size, input_size, generator=generator).to(device)
        try:
            seconds = _seconds_per_call(runner, images, clock, calls=1)   # CPU time: one call is steady
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        results.append({"batch": batch, "images_per_s": round(batch / max(seconds, 1e-12), 2)})
        if clock() - started > budget_s:
            break
        batch *= 2
    if not results:
        raise UserError(f"autotune: even batch {batch} does not fit on {device}; pass a smaller --batch-size")
    fastest = max(r["images_per_s"] for r in results)
    choice = max((r for r in results if r["images_per_s"] >= tolerance * fastest), key=lambda r: r["batch"])
    return {"batch_size": choice["batch"], "measurements": results,
            "clock": "process CPU time" if clock is time.process_time else "wall",
            "tuning_s": round(clock() - started, 3)}


def _seconds_per_call(runner: Runner, images: torch.Tensor, clock, calls: int) -> float:
    """Best seconds per call over ``calls`` timed calls after one warm-up call."""
    best = float("inf")
    with runner.grad_context():
        runner(images)                      # warm-up (allocations, kernel selection)
        _sync(images.device)
        for _ in range(max(1, calls)):
            start = clock()
            runner(images)
            _sync(images.device)
            best = min(best, clock() - start)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

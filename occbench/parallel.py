"""Running a protocol's chunks on many workers: local processes and Ray through joblib, Dask through its client.

The unit of work is the engine's chunk. The driver (the ``occbench run`` process) plans the run, writes
run.json, and schedules every chunk that has no ``.done`` marker as one task. A worker process keeps
one evaluation context per run (model on its device, textures, dataset) in :data:`_STATE`, so the model is
loaded once per worker and not once per chunk, evaluates the chunk exactly as the serial engine does (same
chunk boundaries, the run's recorded batch size and memory format) and writes it into the run directory
with the same atomic files and ``.done`` marker. So a worker killed mid-chunk leaves no ``.done`` and the
chunk is scheduled again, and a killed driver resumes with the same command.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from occbench.errors import UserError

BACKENDS = ("loky", "dask", "ray")
EXTRAS = {"dask": ("distributed", "dask"), "ray": ("ray", "ray")}     # backend -> (module, extra)
# exceptions that mean "a worker process or its connection died", whatever the backend calls them
WORKER_LOST = {"TerminatedWorkerError", "BrokenProcessPool", "KilledWorker", "CommClosedError",
               "FutureCancelledError", "CancelledError", "RayActorError", "ActorDiedError",
               "WorkerCrashedError", "NodeDiedError", "ActorUnavailableError"}
MAX_FRUITLESS_ATTEMPTS = 3     # rounds in a row that lose workers and finish no chunk before the run gives up


@dataclass(frozen=True)
class ScaleOut:
    """How a run is spread over workers (``occbench run --workers/--backend/--scheduler/--address/--devices``).

    workers: loky: worker processes; dask: the local cluster's workers (a --scheduler cluster uses all of
    its workers); ray: tasks in flight (None: one per CPU of the Ray cluster).
    devices: the devices a node's workers take in turn (loky: one worker per entry by default); "auto" = the
    node's GPUs if it has any (loky: one worker per GPU), else the CPU. threads: torch threads per worker.
    """

    workers: int | None = None
    backend: str = "loky"
    scheduler: str | None = None
    address: str | None = None
    devices: tuple[str, ...] | None = None
    threads: int = 1

    @classmethod
    def from_options(cls, workers=None, backend="loky", scheduler=None, address=None, devices=None,
                     threads=1) -> "ScaleOut | None":
        """None when the options ask for the ordinary single-process run."""
        if backend not in BACKENDS:
            raise UserError(f"--backend {backend!r}: valid: {', '.join(BACKENDS)}")
        if workers is not None and workers < 1:
            raise UserError(f"--workers {workers}: give 1 or more")
        if threads < 1:
            raise UserError(f"--worker-threads {threads}: give 1 or more")
        if scheduler and backend != "dask":
            raise UserError(f"--scheduler {scheduler}: only for --backend dask (got --backend {backend})")
        if address and backend != "ray":
            raise UserError(f"--address {address}: only for --backend ray (got --backend {backend})")
        if isinstance(devices, str):
            devices = tuple(d.strip() for d in devices.split(",") if d.strip())
        for device in devices or ():
            if device != "auto":
                try:
                    torch.device(device)
                except RuntimeError:
                    raise UserError(f"--devices {','.join(devices)}: {device!r} is not a device "
                                    "(e.g. cuda:0,cuda:1 or cpu)") from None
        if backend in EXTRAS:
            _require(backend)
        if backend == "loky" and devices and workers is None:     # one worker per device
            workers = (torch.cuda.device_count() or 1) if tuple(devices) == ("auto",) else len(devices)
        if backend == "loky" and (workers or 1) == 1:
            return None
        return cls(workers, backend, scheduler, address, tuple(devices) if devices else None, int(threads))

    def describe(self) -> dict:
        return {"backend": self.backend, "workers": self.workers, "scheduler": self.scheduler,
                "address": self.address, "devices": list(self.devices or ()), "threads": self.threads}


# ------------------------------------------------------------------------------------------ what workers get
@dataclass(frozen=True)
class ModelRecipe:
    """A model each worker rebuilds by name (nothing large is shipped): a zoo model from its checkpoint or
    seed, an outside model (plugin name or builder path) through its builder."""

    name: str
    checkpoint: str | None
    weights: str
    seed: int
    options: dict
    digest: str                    # the driver's weights: a worker whose rebuilt model differs refuses to run
    loader: dict = field(default_factory=dict)   # zoo load_model's smpl_dir, data_dir, allow_partial

    def build(self, device: str):
        from occbench.plugins import load_any_model
        model = load_any_model(self.name, checkpoint=self.checkpoint, device=device, weights=self.weights,
                               seed=self.seed, **self.loader, **self.options)
        if model_digest(model) != self.digest:
            raise UserError(f"model {self.name!r} rebuilt on a worker from {self.checkpoint or 'its seed'} "
                            "differs from the driver's model (weights changed after loading?); save its "
                            "state_dict and load that with --checkpoint, or run with one worker")
        return model


@dataclass(frozen=True)
class PickledModel:
    """An in-memory model (Python API) shipped whole: torch.save bytes, unpickled once per worker."""

    payload: bytes
    digest: str

    def build(self, device: str):
        # full unpickling is safe here: these bytes are the driver's own model, made by torch.save in
        # model_recipe, never a file from outside (those go through occbench.safe_pickle)
        return torch.load(io.BytesIO(self.payload), map_location=device, weights_only=False)


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_recipe(model: torch.nn.Module):
    """How workers get ``model``: rebuilt by name when the zoo's ``load_model`` or a plugin / builder path
    made it (its provenance says how), else the model itself."""
    digest = model_digest(model)
    prov = getattr(model, "provenance", None) or {}
    options = dict(prov.get("options") or {})
    if prov.get("builder"):
        name = (prov.get("plugin") or {}).get("name") or _absolute_builder(prov["builder"])
        return ModelRecipe(name, prov.get("checkpoint"), "checkpoint", int(prov.get("seed") or 0), options,
                           digest)
    if prov.get("model") and not prov.get("outside_model") and (
            prov.get("weights") == "random" or (prov.get("weights") == "checkpoint" and prov.get("checkpoint"))):
        return ModelRecipe(prov["model"], prov.get("checkpoint"), prov["weights"], int(prov.get("seed") or 0),
                           options, digest, loader=dict(prov.get("loader") or {}))
    buffer = io.BytesIO()
    try:
        torch.save(model, buffer)
    except Exception as err:   # a wrapped lambda or local function does not pickle
        raise UserError(f"model {prov.get('model') or type(model).__name__!r} cannot be shipped to workers "
                        f"({type(err).__name__}: {err}); give it as a builder (file.py:function) or run with "
                        "one worker") from None
    return PickledModel(buffer.getvalue(), digest)


def _absolute_builder(path: str) -> str:
    """A builder path whose file part is absolute, so workers with another working directory find it."""
    module, _, attr = path.rpartition(":")
    if module.endswith(".py") or "/" in module or os.sep in module:
        return f"{Path(module).resolve()}:{attr}"
    return path


def portable_dataset(dataset):
    """A shallow copy without the per-process caches (body models, decoded GT) so it pickles small."""
    import copy
    out = copy.copy(dataset)
    if hasattr(out, "_bodies"):
        out._bodies = {}
    if hasattr(out, "_chunk_cache"):
        out._chunk_cache = None
    return out


@dataclass
class ChunkJob:
    """Everything a worker needs to evaluate any chunk of one run; pickled with each task (small: the model
    is a recipe unless it came from the Python API, the dataset holds its records, not images)."""

    token: str                     # one per driver session: the key of a worker's cached context
    run_dir: str
    run_config: dict               # run.json as the driver opened it (the identity chunk markers record)
    model: ModelRecipe | PickledModel
    dataset: object
    protocol: object
    input_size: int
    seed: int
    batch_size: int
    precision: str
    memory_format: str
    pelvis: str
    only: dict | None = None
    max_windows: int | None = None
    dtd_root: str | None = None
    voc_root: str | None = None
    devices: tuple[str, ...] = ("auto",)
    threads: int = 1
    crop_from: str = "canonical"
    incremental: bool = False       # the driver attached incremental inference (run --incremental)
    exit_with_driver: bool = False  # loky: the driver is the worker's parent; quit when it dies


# ------------------------------------------------------------------------------------------ worker side
_STATE: dict = {}       # token -> (context, dataset, device): this process's evaluation context of a run
_SLOTS: list = []       # open lock files: this process's device slot, held until the process ends
_LOADS = {"count": 0}   # models this process has loaded (recorded in run.json: once per worker and run)
_WATCHED: list = []     # the parent pid this process watches (loky: it exits when the driver dies)


def run_chunk(job: ChunkJob, chunk: tuple[int, int, int]) -> dict:
    """Evaluate one chunk on this worker and write it into the run directory; return its counts."""
    from occbench.evaluate import evaluate_chunk, load_chunk
    from occbench.rundir import RunDir
    ctx, dataset, device = _context(job)
    index, first, end = chunk
    forward = ctx.runner.forward_seconds
    loaded, failed = load_chunk(ctx, dataset, first, end)
    tables = evaluate_chunk(ctx, loaded, failed)
    # the driver holds the run's lock; its config gives the identity the chunk's .done marker records
    RunDir(job.run_dir, job.run_config).write_chunk(index, tables)
    return {"chunk": index, "samples": end - first,
            "windows": int(sum(tables["samples"].column("n_windows").to_pylist())),
            "forward_s": ctx.runner.forward_seconds - forward, "host": socket.gethostname(), "pid": os.getpid(),
            "device": device, "model_loads": _LOADS["count"]}


def _context(job: ChunkJob):
    if job.token in _STATE:
        return _STATE[job.token]
    from occbench.engine import _textures_for
    from occbench.evaluate import ChunkContext
    from occbench.runner import Runner
    from occbench.voc import VocOccluders
    _STATE.clear()              # a new run: drop the previous run's model before loading this one
    if job.exit_with_driver:
        _exit_with_parent()
    torch.set_num_threads(job.threads)
    device = _device(job.devices, _claim_slot(job.token))
    model = job.model.build(device)
    _LOADS["count"] += 1
    runner = Runner(model, precision=job.precision, memory_format=job.memory_format)
    if job.incremental:
        from occbench.models.incremental import IncrementalRunner
        runner.incremental = IncrementalRunner(model)
    with contextlib.redirect_stderr(io.StringIO()):   # the driver already warned about fallback textures
        textures, _ = _textures_for(job.protocol, job.input_size, job.dtd_root)
    voc = VocOccluders.open(job.voc_root) if job.protocol.uses_voc else None
    ctx = ChunkContext(protocol=job.protocol, runner=runner, input_size=job.input_size, seed=job.seed,
                       batch_size=job.batch_size, pelvis=job.pelvis, textures=textures, voc=voc,
                       only=job.only, max_windows=job.max_windows, crop_from=job.crop_from)
    _STATE[job.token] = (ctx, job.dataset, device)
    return _STATE[job.token]


def _exit_with_parent(interval: float = 1.0) -> None:
    """End this process soon after its parent (the driver) dies: an idle loky worker would otherwise keep the
    model, and its GPU memory, until loky's idle timeout (minutes)."""
    parent = os.getppid()
    if parent in _WATCHED:
        return
    _WATCHED.append(parent)

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="occbench-exit-with-driver").start()


def _slot_folder(token: str) -> Path:
    return Path(tempfile.gettempdir()) / f"occbench-slots-{token}"


def _claim_slot(token: str) -> int:
    """The lowest slot number no other live worker of this run holds on this node (a file lock that the
    OS releases when the process dies, so a restarted worker takes over the dead one's device)."""
    import fcntl
    for fd in _SLOTS:
        os.close(fd)
    _SLOTS.clear()
    folder = _slot_folder(token)
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(4096):
        fd = os.open(folder / f"{slot}.lock", os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _SLOTS.append(fd)
        return slot
    return os.getpid()


def _device(devices: tuple[str, ...], slot: int) -> str:
    device = devices[slot % len(devices)]
    if device != "auto":
        return device
    count = torch.cuda.device_count()
    return f"cuda:{slot % count}" if count else "cpu"


# ------------------------------------------------------------------------------------------ driver side
def execute(run, job: ChunkJob, todo: list, all_chunks: list, scale: ScaleOut, progress: bool = True) -> dict:
    """Evaluate the chunks ``todo`` on the workers ``scale`` names; return this session's counts.

    Chunks whose worker died are scheduled again (``MAX_FRUITLESS_ATTEMPTS`` rounds in a row that finish
    nothing stop the run with the backend's error; the chunks done so far stay done).
    """
    run.update(parallel=scale.describe())
    counts = {"samples": 0, "windows": 0, "forward_s": 0.0, "retries": 0}
    workers: dict = {}
    monitor = _Progress(run, all_chunks, progress)
    fruitless = 0
    try:
        with _backend(scale) as evaluate:
            while True:
                todo = [c for c in todo if not run.has_chunk(c[0])]
                if not todo:
                    break
                done_before = len(run.marked_chunks())
                try:
                    results = evaluate(job, todo)
                except Exception as err:
                    if not _worker_lost(err):
                        raise
                    counts["retries"] += 1
                    fruitless = 0 if len(run.marked_chunks()) > done_before else fruitless + 1
                    if fruitless >= MAX_FRUITLESS_ATTEMPTS:
                        raise UserError(f"{scale.backend}: workers died {fruitless} times in a row without "
                                        f"finishing a chunk ({type(err).__name__}: {err}); the chunks done so "
                                        "far are kept: run the same command again to resume") from err
                    monitor.note(f"a worker died ({type(err).__name__}); rescheduling its chunks")
                    continue
                for r in results:
                    for key in ("samples", "windows", "forward_s"):
                        counts[key] += r[key]
                    seen = workers.setdefault((r["host"], r["pid"], r["device"]), {"chunks": 0, "model_loads": 0})
                    seen["chunks"] += 1
                    seen["model_loads"] = max(seen["model_loads"], r["model_loads"])
    finally:
        monitor.close()
        shutil.rmtree(_slot_folder(job.token), ignore_errors=True)
    # which processes evaluated how many chunks (a round that lost a worker returns nothing, so its chunks
    # are not counted here) and how often each loaded the model
    run.update(parallel={**scale.describe(), "retries": counts["retries"],
                         "worker_pids": sorted({pid for _, pid, _ in workers}),
                         "workers_seen": [{"host": h, "pid": p, "device": d, **n}
                                          for (h, p, d), n in sorted(workers.items())]})
    return counts


def _worker_lost(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if any(cls.__name__ in WORKER_LOST for cls in type(err).__mro__):
            return True
        err = err.__cause__ or err.__context__
    return False


def _require(backend: str):
    module, extra = EXTRAS[backend]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--backend {backend} needs the {extra} extra: pip install 'occbench[{extra}]'") from None


@contextlib.contextmanager
def _backend(scale: ScaleOut):
    """Connect to the workers ``scale`` names; yield ``evaluate(job, chunks) -> [run_chunk results]``."""
    if scale.backend == "loky":
        import joblib
        with joblib.parallel_config(backend="loky", n_jobs=scale.workers, inner_max_num_threads=scale.threads):
            yield _joblib_map
        # free the workers' models now rather than after loky's idle timeout
        from joblib.externals.loky import get_reusable_executor
        get_reusable_executor().shutdown(wait=True)
    elif scale.backend == "dask":
        with _dask_client(scale) as client:
            yield lambda job, chunks: _dask_map(client, job, chunks)
    else:
        ray = _require("ray")
        import joblib
        from ray.util.joblib import register_ray
        started = not ray.is_initialized()
        if started:
            if scale.address:
                ray.init(address=scale.address, log_to_driver=False)
            else:   # at least 2: joblib runs n_jobs=1 in the driver process whatever the backend
                ray.init(num_cpus=max(2, scale.workers or os.cpu_count()), include_dashboard=False,
                         log_to_driver=False)
        register_ray()
        try:
            with joblib.parallel_config(backend="ray", n_jobs=scale.workers or -1):
                yield _joblib_map
        finally:
            if started:
                ray.shutdown()


def _joblib_map(job, chunks):
    import joblib
    # one chunk per task, so a dead worker loses one chunk's work, not a batch
    return joblib.Parallel(batch_size=1, pre_dispatch="2*n_jobs")(
        joblib.delayed(run_chunk)(job, chunk) for chunk in chunks)


@contextlib.contextmanager
def _dask_client(scale: ScaleOut):
    """The Dask client directly (not joblib's Dask backend, which runs everything in the driver when the
    cluster has one thread): the scheduler itself reruns a task whose worker died."""
    _require("dask")
    from distributed import Client, LocalCluster
    cluster = None
    if scale.scheduler:
        try:
            client = Client(scale.scheduler, timeout=30)
        except (OSError, TimeoutError) as err:
            raise UserError(f"--scheduler {scale.scheduler}: no Dask scheduler answered ({err}); start one "
                            "with `dask scheduler` or leave out --scheduler for a local cluster") from None
    else:
        cluster = LocalCluster(n_workers=scale.workers or os.cpu_count(), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _dask_map(client, job, chunks):
    shipped = client.scatter(job, broadcast=True, hash=False)     # once per worker, not once per task
    futures = client.map(run_chunk, [shipped] * len(chunks), chunks, pure=False)
    try:
        return client.gather(futures)
    finally:
        client.cancel(futures)


class _Progress:
    """One bar on the driver for the whole run: chunks done / total, windows/s over all workers (read from
    the run directory's .done markers, so it counts whatever worker finished a chunk; the driver verifies
    every chunk's checksums when the round ends)."""

    def __init__(self, run, all_chunks, enabled: bool, interval: float = 0.5):
        from tqdm import tqdm
        self.run = run
        self.planned = {c for c, _, _ in all_chunks}
        self.seen = set(run.marked_chunks()) & self.planned
        self.windows = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=len(self.planned), initial=len(self.seen), unit="chunk", disable=not enabled,
                        dynamic_ncols=True, desc=run.config["protocol"]["name"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval):
        while not self._stop.wait(interval):
            self.poll()

    def poll(self):
        import pyarrow.parquet as pq
        new = (set(self.run.marked_chunks()) & self.planned) - self.seen
        for chunk in sorted(new):
            path = self.run.chunk_path(chunk, "samples.parquet")
            self.windows += int(sum(pq.read_table(path, columns=["n_windows"]).column(0).to_pylist()))
        self.seen |= new
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.windows / elapsed:.1f} windows/s")
        self.bar.update(len(new))

    def note(self, text: str):
        self.bar.write(text)

    def close(self):
        self._stop.set()
        self._thread.join()
        self.poll()
        self.bar.close()


def run_chunks(run, ctx, model, dataset, todo, all_chunks, scale: ScaleOut, progress: bool = True, *,
               dtd_root=None, voc_root=None) -> dict:
    """The engine's entry point: evaluate ``todo`` on the workers instead of in this process. Returns
    {"samples", "windows"} evaluated and adds the workers' forward time to ``ctx.runner.forward_seconds``."""
    devices = scale.devices or (("cpu",) if ctx.runner.device.type == "cpu" else ("auto",))
    job = ChunkJob(token=uuid.uuid4().hex[:16], run_dir=str(Path(run.path).resolve()), run_config=run.config,
                   model=model_recipe(model),
                   dataset=portable_dataset(dataset), protocol=ctx.protocol, input_size=ctx.input_size,
                   seed=ctx.seed, batch_size=ctx.batch_size, precision=ctx.runner.precision,
                   memory_format=ctx.runner.memory_format, pelvis=ctx.pelvis, only=ctx.only,
                   max_windows=ctx.max_windows, dtd_root=None if dtd_root is None else str(dtd_root),
                   voc_root=None if voc_root is None else str(voc_root), devices=devices, threads=scale.threads,
                   crop_from=ctx.crop_from, incremental=ctx.runner.incremental is not None,
                   exit_with_driver=scale.backend == "loky")
    counts = execute(run, job, todo, all_chunks, scale, progress)
    ctx.runner.forward_seconds += counts["forward_s"]
    return {"samples": counts["samples"], "windows": counts["windows"]}

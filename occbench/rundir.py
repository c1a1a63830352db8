"""The run directory and the one home of its format: file names, schemas, writing and reading.

Tables are built here (:func:`joint_table`, :func:`chunk_tables`); run.json and chunked parquet files are
written atomically (resumable, mergeable) and read back.

Layout::

    RUN_DIR/
      run.json                  how the run was made (model, checkpoint sha256, dataset + provenance, protocol
                                parameters, conventions, seed, batch size, precision, versions, device, ...)
      chunks/chunk-000012.joints.parquet    per (sample, window, joint) errors of the chunk's samples
      chunks/chunk-000012.samples.parquet   per-sample summaries (clean errors, mean, worst window)
      chunks/chunk-000012.failed.parquet    samples that could not be evaluated, with the reason
      chunks/chunk-000012.done              written last: the chunk is complete
      chunks/chunk-000012.predictions.parquet  the clean prediction (rotmat, betas, cam) of each sample
      joints.parquet, samples.parquet, failed.parquet, predictions.parquet   all chunks in order (at the end)
      metrics.json              the run's numbers (clean / occluded / worst window, per joint, per pattern/DoC)

Safety (README "What occbench checks"): the directory is locked while a process writes it (``.lock``, an
advisory ``flock`` that the kernel releases when the process dies, holding who took it); each ``.done`` marker
stores the sha256 of the chunk's files and the run's identity, so a damaged chunk is found on resume, removed,
recomputed and reported, and a damaged run.json can be rebuilt from a matching command; orphan ``*.tmp*``
files of a killed write are removed; OS errors (``--out`` is a file, not writable, disk full) are one-line
errors, and what was written stays resumable.

Samples are cut into fixed chunks of ``chunk_samples`` consecutive dataset indices; chunk ``c`` belongs to
shard ``k`` of ``N`` when ``c % N == k``. Each chunk file is written to a temporary name and renamed, and the
``.done`` marker is renamed into place last, so a run killed at any point (kill -9) loses at most the chunk
in flight; started again with the same command it skips every complete chunk. The final files are the
chunks concatenated in chunk order, so a resumed run, a single run and merged shards give the same tables.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from occbench.assets import sha256_of
from occbench.data.joints import LSP14_NAMES
from occbench.errors import UserError
from occbench.windows import TABLE_COLUMNS

RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
TABLES = ("joints", "samples", "failed", "predictions")
N_JOINTS = len(LSP14_NAMES)   # rows per (sample, window) in joints tables

# per (sample, window, joint): errors, then the window table's columns (occbench.windows)
JOINT_SCHEMA = pa.schema(
    [("sample_index", pa.int64()), ("sample_id", pa.string()), ("window", pa.int32()), ("joint", pa.int8()),
     ("mpjpe", pa.float32()), ("pa_mpjpe", pa.float32()), ("pckh", pa.float32()), ("visible", pa.bool_()),
     ("occluded", pa.bool_()), ("in_crop", pa.bool_()), ("err_x", pa.float32()), ("err_y", pa.float32()),
     ("err_z", pa.float32()), ("pve", pa.float32())]
    + [(name, pa.string() if dtype is object else (pa.float64() if dtype is np.float64 else pa.int64()))
       for name, dtype in TABLE_COLUMNS.items() if name != "window"])
# per sample: clean errors, the mean over windows and the worst window (occbench.scoring.sample_summary)
SUMMARY_SCHEMA = pa.schema([
    ("sample_index", pa.int64()), ("sample_id", pa.string()), ("n_windows", pa.int32()),
    ("clean_mpjpe", pa.float64()), ("clean_pa_mpjpe", pa.float64()), ("clean_pckh", pa.float64()),
    ("mean_mpjpe", pa.float64()), ("mean_pa_mpjpe", pa.float64()), ("mean_pckh", pa.float64()),
    ("worst_window", pa.int32()), ("worst_mpjpe", pa.float64()), ("worst_pa_mpjpe", pa.float64()),
    ("worst_pckh", pa.float64()), ("worst_n_visible", pa.int32()), ("worst_texture", pa.string()),
    ("worst_tex_x", pa.int64()), ("worst_tex_y", pa.int64()), ("worst_x0", pa.float64()),
    ("worst_y0", pa.float64()), ("worst_size", pa.float64()), ("worst_pattern", pa.string()),
    ("worst_doc", pa.int64()), ("worst_target_joint", pa.int64())])
FAILED_SCHEMA = pa.schema([("sample_index", pa.int64()), ("sample_id", pa.string()), ("reason", pa.string())])
# the clean prediction of every sample (sensitivity meshes are drawn on it): rotmat (216), betas (10), cam (3)
PREDICTION_SCHEMA = pa.schema([("sample_index", pa.int64()), ("sample_id", pa.string()),
                               ("rotmat", pa.list_(pa.float32())), ("betas", pa.list_(pa.float32())),
                               ("cam", pa.list_(pa.float32()))])
# run.json keys that must match for a resume or a merge (everything that changes the numbers)
IDENTITY_KEYS = ("model", "dataset", "protocol", "seed", "precision", "batch_size", "memory_format",
                 "chunk_samples", "n_samples", "textures", "replay", "conventions", "max_windows",
                 "search")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> "Shard | None":
        if text in (None, "", "0/1"):
            return None
        try:
            k, n = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise UserError(f"--shard {text!r}: expected k/N with 0 <= k < N (e.g. 0/4)") from None
        if not 0 <= k < n:
            raise UserError(f"--shard {text!r}: expected k/N with 0 <= k < N (e.g. 0/4)")
        return cls(k, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def plan_chunks(n_samples: int, chunk_samples: int, shard: Shard | None = None) -> list[tuple[int, int, int]]:
    """[(chunk index, first sample, end sample)] of this shard."""
    chunks = []
    for c, start in enumerate(range(0, n_samples, chunk_samples)):
        if shard is None or c % shard.count == shard.index:
            chunks.append((c, start, min(start + chunk_samples, n_samples)))
    return chunks


# ---------------------------------------------------------------------------------------- tables
def joint_table(windows: dict, sample_index, sample_ids, *, mpjpe, pa_mpjpe, pckh, visible, occluded, in_crop,
                axis_err, pve) -> pa.Table:
    """The joints table of rows (sample, window): ``windows`` is their window table (occbench.windows) and
    sample_index / sample_ids / pve are one value per row; mpjpe, pa_mpjpe, pckh, visible, occluded, in_crop
    are (rows, 14) and axis_err (rows, 14, 3). One output row per (row, joint)."""
    n_rows = len(windows["window"])
    rep = lambda a: np.repeat(a, N_JOINTS)
    columns = {
        "sample_index": rep(sample_index), "sample_id": rep(sample_ids).astype(str),
        "window": rep(windows["window"]).astype(np.int32),
        "joint": np.tile(np.arange(N_JOINTS, dtype=np.int8), n_rows),
        "mpjpe": mpjpe.reshape(-1), "pa_mpjpe": pa_mpjpe.reshape(-1), "pckh": pckh.reshape(-1),
        "visible": visible.reshape(-1), "occluded": occluded.reshape(-1), "in_crop": in_crop.reshape(-1),
        "err_x": axis_err[..., 0].reshape(-1), "err_y": axis_err[..., 1].reshape(-1),
        "err_z": axis_err[..., 2].reshape(-1), "pve": rep(pve),
    }
    for name in TABLE_COLUMNS:
        if name != "window":
            columns[name] = rep(windows[name]).astype(str) if TABLE_COLUMNS[name] is object else rep(windows[name])
    return pa.table(columns, schema=JOINT_SCHEMA)


def prediction_table(sample_index, sample_ids, rotmat, betas, cam) -> pa.Table:
    """rotmat (N,24,3,3), betas (N,10), cam (N,3) of N samples, stored flat per sample."""
    return pa.table({"sample_index": pa.array(list(sample_index), pa.int64()), "sample_id": list(sample_ids),
                     "rotmat": list(np.asarray(rotmat).reshape(len(sample_ids), -1)), "betas": list(betas),
                     "cam": list(cam)}, schema=PREDICTION_SCHEMA)


def chunk_tables(joints: pa.Table | None, summaries: list[dict], failed: list[tuple],
                 predictions: pa.Table | None = None) -> dict[str, pa.Table]:
    """The four tables of a chunk. summaries: rows of SUMMARY_SCHEMA; failed: (sample_index, sample_id,
    reason); a missing joints or predictions table is written empty."""
    summary = pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA) if summaries else SUMMARY_SCHEMA.empty_table()
    fail = pa.table({"sample_index": [f[0] for f in failed], "sample_id": [str(f[1]) for f in failed],
                     "reason": [str(f[2]) for f in failed]}, schema=FAILED_SCHEMA)
    return {"joints": JOINT_SCHEMA.empty_table() if joints is None else joints, "samples": summary,
            "failed": fail, "predictions": PREDICTION_SCHEMA.empty_table() if predictions is None else predictions}


def table_path(run_path, name: str) -> Path:
    """A finished run's table ``name`` (one of TABLES): RUN_DIR/<name>.parquet."""
    return Path(run_path) / f"{name}.parquet"


def read_config(run_path) -> dict:
    """run.json of a run directory."""
    return json.loads((Path(run_path) / RUN_JSON).read_text())


def existing_config(run_path) -> dict | None:
    """run.json of a run in ``run_path``; None when there is none or it is damaged (then
    :meth:`RunDir.open_or_create` decides whether it can be rebuilt)."""
    if not (Path(run_path) / RUN_JSON).is_file():
        return None
    try:
        config = read_config(run_path)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def read_metrics(run_path) -> dict:
    """metrics.json of a finished run directory ({} when it has none)."""
    path = Path(run_path) / METRICS_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def _os_error(path: Path, err: OSError, doing: str) -> UserError:
    """One line for an OS error while writing a run: what failed, why, and that the run stays resumable."""
    if err.errno == errno.ENOSPC:
        why = "the disk is full; free space and run the same command again to resume"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied; pass a writable --out (or fix the folder's permissions) and run again"
    else:
        why = f"{err.strerror or err}; fix it and run the same command again to resume"
    return UserError(f"{doing} {path}: {why}")


@contextmanager
def _atomic(path: Path):
    """Yield a temporary name next to ``path``; renamed onto ``path`` when the block ends, removed when the
    write fails (an OSError becomes the one-line error of :func:`_os_error`)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise _os_error(path, err, "cannot write") from None


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic(path) as tmp:
        tmp.write_bytes(data)
        _fsync(tmp)


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def write_json(path: Path, data: dict) -> None:
    _atomic_write_bytes(Path(path), (json.dumps(data, indent=2, sort_keys=False, default=_json_default)
                                     + "\n").encode())


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _atomic_write_table(table: pa.Table, path: Path) -> str:
    """Write ``table`` to ``path`` atomically; return the file's sha256."""
    with _atomic(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
        _fsync(tmp)
        digest = sha256_of(tmp)
    return digest


def identity_of(config: dict) -> str:
    """sha256 (16 hex) of everything that must match for a resume: the identity keys, shard and limit."""
    keep = {key: config.get(key) for key in IDENTITY_KEYS + ("shard", "limit")}
    return hashlib.sha256(json.dumps(_canon(keep), sort_keys=True).encode()).hexdigest()[:16]


class RunLock:
    """Advisory lock on ``RUN_DIR/.lock`` held while one process writes the run.

    ``flock`` is released by the kernel when the holder dies (even ``kill -9``), so a crash never leaves a
    stale lock on a local disk. The file says who holds it, for the message the second process prints.
    """

    def __init__(self, path: Path):
        self.path = Path(path) / ".lock"
        self._handle = None

    def acquire(self) -> "RunLock":
        import fcntl
        try:
            handle = open(self.path, "a+")
        except OSError as err:
            raise _os_error(self.path.parent, err, "cannot use run directory") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{self.path.parent} is being written by {holder}; wait for it to finish or "
                            "pass another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            import fcntl
            self._handle.seek(0)
            self._handle.truncate()
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None


def _prepare_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a folder; pass a folder for the run directory")
    try:
        (path / "chunks").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _os_error(path, err, "cannot create run directory") from None
    if not os.access(path, os.W_OK) or not os.access(path / "chunks", os.W_OK):
        raise UserError(f"cannot write run directory {path}: permission denied; pass a writable --out "
                        "(or fix the folder's permissions) and run again")


class RunDir:
    """A run directory on disk. ``config`` is the run.json content.

    ``recomputed`` lists (chunk, reason) for every damaged chunk found on resume (it was removed and will be
    computed again); ``cleaned`` the orphan temporary files removed.
    """

    def __init__(self, path, config: dict):
        self.path = Path(path)
        self.config = config
        self.lock = RunLock(self.path)
        self.recomputed: list[tuple[int, str]] = []
        self.cleaned: list[str] = []

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open_or_create(cls, path, config: dict, lock: bool = True) -> "RunDir":
        """Create ``path`` with ``config``, or reopen it when it holds the same run (resume).

        The directory is locked (:class:`RunLock`) until :meth:`close`. A directory holding a different run
        (any identity key differs) is a UserError naming the key; nothing in it is changed. A run.json that
        cannot be read is rebuilt from ``config`` only when every complete chunk was written by this same run
        (same identity); otherwise it is a UserError.
        """
        path = Path(path)
        _prepare_folder(path)
        run = cls(path, config)
        if lock:
            run.lock.acquire()
        try:
            run._open(config)
        except BaseException:
            run.close()
            raise
        return run

    def _open(self, config: dict) -> None:
        run_json = self.path / RUN_JSON
        self._clean_orphans()
        if run_json.is_file():
            try:
                old = json.loads(run_json.read_text())
                if not isinstance(old, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as err:
                old = self._recover_config(config, err)
            for key in IDENTITY_KEYS + ("shard", "limit"):
                if _canon(old.get(key)) != _canon(config.get(key)):
                    raise UserError(
                        f"{self.path} holds a different run ({key} differs: {old.get(key)!r} there, "
                        f"{config.get(key)!r} now); pass another --out or delete that directory")
            self.config = {**old, "resumed": old.get("resumed", 0) + 1}
        else:
            self.config = config
        write_json(run_json, self.config)

    def _recover_config(self, config: dict, err: Exception) -> dict:
        identity = identity_of(config)
        markers = sorted((self.path / "chunks").glob("chunk-*.done"))
        identities = {(_read_marker(m) or {}).get("identity") for m in markers}
        if markers and identities != {identity}:
            raise UserError(f"{self.path / 'run.json'} is damaged ({err}) and its chunks were not written by this "
                            "command's run; pass another --out, or delete that directory to start again")
        self.recomputed.append((-1, f"run.json was damaged ({err}); rebuilt from this command "
                                    f"({len(markers)} complete chunks of the same run kept)"))
        return config

    def _clean_orphans(self) -> None:
        for folder in (self.path, self.path / "chunks"):
            for tmp in folder.glob("*.tmp*"):
                if tmp.is_file():
                    _discard(tmp)
                    self.cleaned.append(tmp.name)

    def close(self) -> None:
        """Release the lock (also released by the kernel if the process dies)."""
        self.lock.release()

    @classmethod
    def load(cls, path) -> "RunDir":
        path = Path(path)
        if not (path / RUN_JSON).is_file():
            raise UserError(f"{path} is not a run directory (no {RUN_JSON})")
        try:
            config = json.loads((path / RUN_JSON).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{path / 'run.json'} cannot be read ({err}); run the command that made it again "
                            "with the same --out to rebuild it") from None
        return cls(path, config)

    @staticmethod
    def exists(path) -> bool:
        """``path`` holds a run (its run.json), finished or not."""
        return (Path(path) / RUN_JSON).is_file()

    def is_finished(self) -> bool:
        """The final tables are written (chunks concatenated)."""
        return self.table_path("samples").is_file()

    def read_table(self, name: str, columns=None) -> pa.Table:
        """A finished run's table ``name`` (one of TABLES)."""
        return pq.read_table(self.table_path(name), columns=columns)

    def update(self, **values) -> None:
        self.config.update(values)
        write_json(self.path / RUN_JSON, self.config)

    # ------------------------------------------------------------------ chunks
    def chunk_path(self, chunk: int, table: str) -> Path:
        return self.path / "chunks" / f"chunk-{chunk:06d}.{table}"

    def table_path(self, name: str) -> Path:
        return table_path(self.path, name)

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.path / METRICS_JSON, metrics)

    def chunk_problem(self, chunk: int) -> str | None:
        """None when chunk ``chunk`` is complete and intact, else why not ("missing" when never written)."""
        marker = self.chunk_path(chunk, "done")
        if not marker.is_file():
            return "missing"
        info = _read_marker(marker)
        if info is None:
            return "its .done marker is damaged"
        expected_identity = identity_of(self.config)
        if info.get("identity") not in (None, expected_identity):
            return "it was written by another run"
        for name in TABLES:
            file = self.chunk_path(chunk, f"{name}.parquet")
            if not file.is_file():
                return f"{file.name} is missing"
            digest = info.get("files", {}).get(name)
            if digest is None:   # a marker from before checksums: the file must at least parse
                try:
                    pq.read_metadata(file)
                except Exception as err:   # noqa: BLE001 - any parse failure means a damaged file
                    return f"{file.name} cannot be read ({type(err).__name__})"
            elif sha256_of(file) != digest:
                return f"{file.name} does not match its checksum"
        return None

    def has_chunk(self, chunk: int) -> bool:
        """True when the chunk is complete and intact; a damaged chunk is removed, recorded in
        :attr:`recomputed` and reported as not done (so it is computed again)."""
        problem = self.chunk_problem(chunk)
        if problem is None:
            return True
        if problem != "missing":
            self.recomputed.append((chunk, problem))
            self.remove_chunk(chunk)
        return False

    def remove_chunk(self, chunk: int) -> None:
        _discard(self.chunk_path(chunk, "done"))   # first: a half-removed chunk is never taken as done
        for name in TABLES:
            _discard(self.chunk_path(chunk, f"{name}.parquet"))

    def marked_chunks(self) -> list[int]:
        """Chunks with a ``.done`` marker, not verified (cheap: for watching a run that workers write)."""
        return sorted(int(p.name.split("-")[1].split(".")[0]) for p in (self.path / "chunks").glob("chunk-*.done"))

    def done_chunks(self) -> list[int]:
        """Complete and intact chunks (damaged ones are skipped and recorded in :attr:`recomputed`)."""
        good = []
        for chunk in self.marked_chunks():
            problem = self.chunk_problem(chunk)
            if problem is None:
                good.append(chunk)
            else:
                self.recomputed.append((chunk, problem))
        return good

    def write_chunk(self, chunk: int, tables: dict[str, pa.Table]) -> None:
        digests = {name: _atomic_write_table(tables[name], self.chunk_path(chunk, f"{name}.parquet"))
                   for name in TABLES}
        marker = {"identity": identity_of(self.config), "files": digests}
        _atomic_write_bytes(self.chunk_path(chunk, "done"), (json.dumps(marker) + "\n").encode())

    def read_chunk(self, chunk: int, table: str) -> pa.Table:
        return pq.read_table(self.chunk_path(chunk, f"{table}.parquet"))

    # ------------------------------------------------------------------ final files
    def concatenate(self, chunks: list[int]) -> None:
        """Write joints/samples/failed.parquet as the given chunks in order, one chunk in memory at a time."""
        for name in TABLES:
            if not chunks:
                raise UserError(f"{self.path}: no complete chunk to write {name}.parquet from")
            with _atomic(table_path(self.path, name)) as tmp:
                writer = None
                for chunk in chunks:
                    table = self.read_chunk(chunk, name)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                    writer.write_table(table)
                writer.close()


def _read_marker(path: Path) -> dict | None:
    """The content of a ``.done`` marker: {} for a marker from before checksums ("ok"), None if damaged."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if text.strip() == "ok":
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) and isinstance(info.get("files", {}), dict) else None


def _canon(value):
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def copy_chunks(source: RunDir, target: RunDir, chunks: list[int]) -> None:
    """Copy complete chunks between runs of the same identity (shards -> merged run); checksums re-stamped."""
    for chunk in chunks:
        digests = {}
        for name in TABLES:
            dst = target.chunk_path(chunk, f"{name}.parquet")
            with _atomic(dst) as tmp:
                shutil.copyfile(source.chunk_path(chunk, f"{name}.parquet"), tmp)
            digests[name] = sha256_of(dst)
        marker = {"identity": identity_of(target.config), "files": digests}
        _atomic_write_bytes(target.chunk_path(chunk, "done"), (json.dumps(marker) + "\n").encode())

"""The run directory: run.json + chunked parquet files, written atomically, resumable, mergeable.

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

Samples are cut into fixed chunks of ``chunk_samples`` consecutive dataset indices; chunk ``c`` belongs to
shard ``k`` of ``N`` when ``c % N == k``. Each chunk file is written to a temporary name and renamed, and the
``.done`` marker is renamed into place last, so a run killed at any point (kill -9) loses at most the chunk
in flight; started again with the same command it skips every complete chunk. The final files are the
chunks concatenated in chunk order, so a resumed run, a single run and merged shards give the same tables.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from occbench.errors import UserError

TABLES = ("joints", "samples", "failed", "predictions")
# run.json keys that must match for a resume or a merge (everything that changes the numbers)
IDENTITY_KEYS = ("model", "dataset", "protocol", "seed", "precision", "batch_size", "memory_format",
                 "chunk_samples", "n_samples", "textures", "replay", "conventions", "max_windows")


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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunDir:
    """A run directory on disk. ``config`` is the run.json content."""

    def __init__(self, path, config: dict):
        self.path = Path(path)
        self.config = config

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open_or_create(cls, path, config: dict) -> "RunDir":
        """Create ``path`` with ``config``, or reopen it when it holds the same run (resume).

        A directory holding a different run (any identity key differs) is a UserError naming the key.
        """
        path = Path(path)
        run_json = path / "run.json"
        if run_json.is_file():
            old = json.loads(run_json.read_text())
            for key in IDENTITY_KEYS + ("shard", "limit"):
                if _canon(old.get(key)) != _canon(config.get(key)):
                    raise UserError(
                        f"{path} holds a different run ({key} differs: {old.get(key)!r} there, "
                        f"{config.get(key)!r} now); pass another --out or delete that directory")
            merged = {**old, "resumed": old.get("resumed", 0) + 1}
            run = cls(path, merged)
            write_json(run_json, merged)
            return run
        (path / "chunks").mkdir(parents=True, exist_ok=True)
        write_json(run_json, config)
        return cls(path, config)

    @classmethod
    def load(cls, path) -> "RunDir":
        path = Path(path)
        if not (path / "run.json").is_file():
            raise UserError(f"{path} is not a run directory (no run.json)")
        return cls(path, json.loads((path / "run.json").read_text()))

    def update(self, **values) -> None:
        self.config.update(values)
        write_json(self.path / "run.json", self.config)

    # ------------------------------------------------------------------ chunks
    def chunk_path(self, chunk: int, table: str) -> Path:
        return self.path / "chunks" / f"chunk-{chunk:06d}.{table}"

    def has_chunk(self, chunk: int) -> bool:
        return self.chunk_path(chunk, "done").is_file()

    def done_chunks(self) -> list[int]:
        return sorted(int(p.name.split("-")[1].split(".")[0]) for p in (self.path / "chunks").glob("chunk-*.done"))

    def write_chunk(self, chunk: int, tables: dict[str, pa.Table]) -> None:
        for name in TABLES:
            _atomic_write_table(tables[name], self.chunk_path(chunk, f"{name}.parquet"))
        _atomic_write_bytes(self.chunk_path(chunk, "done"), b"ok\n")

    def read_chunk(self, chunk: int, table: str) -> pa.Table:
        return pq.read_table(self.chunk_path(chunk, f"{table}.parquet"))

    # ------------------------------------------------------------------ final files
    def concatenate(self, chunks: list[int]) -> None:
        """Write joints/samples/failed.parquet as the given chunks in order, one chunk in memory at a time."""
        for name in TABLES:
            target = self.path / f"{name}.parquet"
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            writer = None
            for chunk in chunks:
                table = self.read_chunk(chunk, name)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
            if writer is None:
                raise UserError(f"{self.path}: no complete chunk to write {name}.parquet from")
            writer.close()
            os.replace(tmp, target)


def _canon(value):
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def copy_chunks(source: RunDir, target: RunDir, chunks: list[int]) -> None:
    for chunk in chunks:
        for name in TABLES:
            src = source.chunk_path(chunk, f"{name}.parquet")
            dst = target.chunk_path(chunk, f"{name}.parquet")
            tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        _atomic_write_bytes(target.chunk_path(chunk, "done"), b"ok\n")

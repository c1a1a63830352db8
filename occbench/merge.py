"""Merging the shard run directories of one run (``occbench run --shard k/N``) into one run directory, identical
to the unsharded run; never over another run."""
from __future__ import annotations

import json
from pathlib import Path

from occbench.errors import UserError
from occbench.rundir import RunDir, copy_chunks, existing_config, plan_chunks
from occbench.scoring import format_summary, summarize


def merge_runs(shard_dirs, out_dir) -> Path:
    """Join shard run directories of one run into ``out_dir``: identical to the unsharded run."""
    shards = [RunDir.load(d) for d in shard_dirs]
    if not shards:
        raise UserError("merge: give the shard run directories")
    first = shards[0].config
    for other in shards[1:]:
        for key in ("model", "dataset", "protocol", "seed", "precision", "batch_size", "memory_format",
                    "chunk_samples", "n_samples", "textures", "conventions", "replay", "search"):
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
    _check_merge_target(Path(out_dir), config)
    out = RunDir.open_or_create(out_dir, config)
    try:
        for c in all_chunks:
            if not out.has_chunk(c):
                copy_chunks(owner[c], out, [c])
        metrics = summarize(out, all_chunks)
        out.concatenate(all_chunks)
        out.write_metrics(metrics)
        out.update(**{**config, "status": "complete"})
    finally:
        out.close()
    print(format_summary(out.config, metrics))
    print(f"run directory: {out.path}")
    return out.path


def _check_merge_target(out_dir: Path, config: dict) -> None:
    """``--out`` of a merge must be new, empty, or the same merge (then it is finished again, nothing lost)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"merge: --out {out_dir} is a file; pass a new folder")
    if RunDir.exists(out_dir):
        old = existing_config(out_dir) or {}
        if old.get("merged_from") != config["merged_from"]:
            what = f"a merge of {old['merged_from']}" if old.get("merged_from") else "another run"
            raise UserError(f"merge: --out {out_dir} holds another run ({what}); merging would overwrite it; "
                            "pass a new --out")
        return
    if any(p.name != ".lock" for p in out_dir.iterdir()):
        raise UserError(f"merge: --out {out_dir} is not empty; pass a new or empty folder")

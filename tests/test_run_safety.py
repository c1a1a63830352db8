"""A finished run is never destroyed and a resumed run never reuses what it cannot verify: dataset identity by
content, checksummed chunks (damaged ones recomputed and reported), orphan temporary files, one writer at a
time (lock), merges that refuse to overwrite another run, and one-line errors for an unusable --out."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import occbench
from occbench.engine import run_protocol
from occbench.merge import merge_runs
from occbench.errors import UserError
from occbench.rundir import RunDir

TABLES = ("joints", "samples", "failed", "predictions")


def _run(model, dataset, out, **options):
    settings = dict(limit=3, batch_size=8, memory_format="contiguous", chunk_samples=1, max_windows=6,
                    progress=False, quiet=True)
    settings.update(options)
    return run_protocol(model, dataset, "occsens40", out, **settings)


def _tables(run_dir):
    return {name: pd.read_parquet(Path(run_dir) / f"{name}.parquet") for name in TABLES}


def _assert_same_tables(a, b):
    for name in TABLES:
        pd.testing.assert_frame_equal(_tables(a)[name], _tables(b)[name], check_exact=True)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def reference(pare_demo, demo_set, tmp_path_factory):
    return _run(pare_demo, demo_set, tmp_path_factory.mktemp("ref") / "run")


def test_resume_refuses_another_dataset_with_the_same_name_and_size(pare_demo, demo_set, reference, tmp_path):
    """Another annotation file with the same name and row count is not the same dataset."""
    out = tmp_path / "run"
    shutil_copy(reference, out)
    before = _snapshot(out)
    other = occbench.open_dataset("demo")
    other.records.center = other.records.center + 1.0     # same name, same count, other annotations
    other._fingerprint = None
    with pytest.raises(UserError, match="dataset differs"):
        _run(pare_demo, other, out)
    assert _snapshot(out) == before


def test_damaged_chunks_are_recomputed_and_reported(pare_demo, demo_set, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil_copy(reference, out)
    chunks = out / "chunks"
    (chunks / "chunk-000000.joints.parquet").write_bytes(b"not parquet")           # bad parquet
    samples = chunks / "chunk-000001.samples.parquet"
    data = bytearray(samples.read_bytes())
    data[len(data) // 2] ^= 0xFF                                                     # one flipped byte
    samples.write_bytes(bytes(data))
    (chunks / "chunk-000002.done").write_text("{broken")                            # damaged marker
    (chunks / "chunk-000001.joints.parquet.tmp999").write_bytes(b"orphan")           # killed write
    resumed = _run(pare_demo, demo_set, out, quiet=False)
    err = capsys.readouterr().err
    assert "chunk 0" in err and "chunk 1" in err and "chunk 2" in err and "recomputed" in err
    assert not list(out.rglob("*.tmp*"))
    _assert_same_tables(resumed, reference)
    recorded = json.loads((out / "run.json").read_text())["recomputed_chunks"]
    assert sorted(r["chunk"] for r in recorded) == [0, 1, 2]


def test_damaged_run_json_is_rebuilt_only_for_the_same_run(pare_demo, demo_set, reference, tmp_path):
    out = tmp_path / "run"
    shutil_copy(reference, out)
    (out / "run.json").write_text("{ half a file")
    _assert_same_tables(_run(pare_demo, demo_set, out), reference)
    assert json.loads((out / "run.json").read_text())["protocol"]["name"] == "occsens40"
    (out / "run.json").write_text("{ half a file")
    before = _snapshot(out)
    with pytest.raises(UserError, match="damaged"):
        _run(pare_demo, demo_set, out, seed=5)          # another run's chunks: not rebuilt
    assert _snapshot(out) == before


def test_merge_never_overwrites_another_run(pare_demo, demo_set, reference, tmp_path):
    shards = [_run(pare_demo, demo_set, tmp_path / f"s{k}", shard=f"{k}/2") for k in range(2)]
    other = tmp_path / "other"
    _run(pare_demo, demo_set, other, seed=7)
    before = _snapshot(other)
    with pytest.raises(UserError, match="holds another run"):
        merge_runs(shards, other)
    assert _snapshot(other) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        merge_runs(shards, tmp_path / "busy")
    merged = merge_runs(shards, tmp_path / "merged")
    _assert_same_tables(merged, reference)
    _assert_same_tables(merge_runs(shards, tmp_path / "merged"), reference)   # the same merge again: fine


def test_second_writer_is_told_who_holds_the_run(pare_demo, demo_set, tmp_path):
    out = tmp_path / "run"
    holder = RunDir.open_or_create(out, {"occbench_run": 1, "protocol": {"name": "x"}})
    try:
        with pytest.raises(UserError, match=f"being written by pid {os.getpid()}"):
            _run(pare_demo, demo_set, out)
    finally:
        holder.close()


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal
        from occbench.rundir import RunDir
        RunDir.open_or_create({str(out)!r}, {{"occbench_run": 1}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", script], check=False)
    RunDir.open_or_create(out, {"occbench_run": 1}).close()     # no stale lock


def test_out_that_is_a_file_or_unwritable_is_one_line(pare_demo, demo_set, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        _run(pare_demo, demo_set, target)
    if os.geteuid() != 0:   # root writes anywhere: the permission case is only meaningful for a user
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(UserError, match="permission denied"):
            _run(pare_demo, demo_set, locked / "run")


def test_full_disk_is_one_line_and_the_run_resumes(pare_demo, demo_set, reference, tmp_path, monkeypatch):
    import occbench.rundir as rundir
    real = rundir.pq.write_table
    calls = {"n": 0}

    def failing(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 6:        # in the second chunk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(rundir.pq, "write_table", failing)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="disk is full"):
        _run(pare_demo, demo_set, out)
    assert not list(out.rglob("*.tmp*"))
    monkeypatch.setattr(rundir.pq, "write_table", real)
    _assert_same_tables(_run(pare_demo, demo_set, out), reference)


def test_cli_errors_exit_2_without_traceback(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = subprocess.run([sys.executable, "-m", "occbench", "run", "-m", "pare-demo", "-p", "clean",
                             "--limit", "2", "--out", str(target), "--no-progress", "--no-report"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert "is a file" in result.stderr and "Traceback" not in result.stderr
    assert target.read_text() == "x"


def shutil_copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    lock = Path(dst) / ".lock"
    if lock.exists():
        lock.unlink()

"""Same command, same numbers: two fresh processes running the same `occbench run` write bit-identical tables."""
import json
import os
import subprocess
import sys

import pandas as pd


def run_once(out, threads):
    command = [sys.executable, "-m", "occbench", "run", "--model", "pare-demo", "--protocol", "advocc80",
               "--dataset", "demo", "--limit", "2", "--max-windows", "48", "--threads", str(threads),
               "--no-progress", "--no-report", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run(command, check=True, capture_output=True, text=True, env=env, timeout=600)
    return pd.read_parquet(out / "joints.parquet"), json.loads((out / "run.json").read_text())


def test_two_fresh_runs_of_one_command_give_bit_identical_tables(tmp_path):
    first, config = run_once(tmp_path / "a", threads=2)
    second, _ = run_once(tmp_path / "b", threads=2)
    assert config["threads"] == 2 and config["execution"]["batch_rule"] == "default"
    assert len(first) == 2 * 49 * 14
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    for column in ("mpjpe", "pa_mpjpe"):
        assert (first[column].to_numpy() == second[column].to_numpy()).all()     # bit for bit, NaN-free here

"""occbench.parallel: a run spread over loky, Dask or Ray workers gives the tables of one process, bit for bit,
also when a worker is killed in the middle of the run."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow.parquet as pq
import pytest
import torch

from occbench.cli import main
from occbench.errors import UserError
from occbench.parallel import ModelRecipe, PickledModel, ScaleOut, _worker_lost, model_digest, model_recipe

N_SAMPLES = 6
# six chunks of one sample, four windows each: several tasks per worker, a few seconds in all
ARGS = ["run", "--model", "pare-demo", "--protocol", "occsens40", "--dataset", "demo", "--limit", str(N_SAMPLES),
        "--max-windows", "4", "--chunk-samples", "1", "--batch-size", "8", "--memory-format", "contiguous",
        "--no-progress", "--no-report"]


def run_cli(out, *extra):
    main(ARGS + ["--out", str(out), *extra])
    return out


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process, one thread (the workers run one thread each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield run_cli(tmp_path_factory.mktemp("single") / "run")
    finally:
        torch.set_num_threads(threads)


def assert_same_tables(a, b):
    for name in ("joints", "samples", "failed", "predictions"):
        left, right = pq.read_table(a / f"{name}.parquet"), pq.read_table(b / f"{name}.parquet")
        assert left.num_rows > 0 or name == "failed"
        assert left.equals(right), name
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    config = json.loads((b / "run.json").read_text())
    # every chunk a worker wrote passed the driver's checksum and identity check (none was recomputed)
    assert "recomputed_chunks" not in config
    # each worker process loaded the model once for all its chunks
    seen = config["parallel"]["workers_seen"]
    assert seen and all(w["model_loads"] == 1 for w in seen), seen
    assert os.getpid() not in config["parallel"]["worker_pids"]


class Killer:
    """Kills one process from ``pids()`` (SIGKILL) once the run has its first complete chunk."""

    def __init__(self, run_dir, pids):
        self.run_dir, self.pids = run_dir, pids
        self.killed, self.done_at_kill = None, None
        self.thread = threading.Thread(target=self._wait_and_kill, daemon=True)
        self.thread.start()

    def _wait_and_kill(self):
        deadline = time.time() + 240
        while time.time() < deadline:
            done = len(list((self.run_dir / "chunks").glob("*.done")))
            pids = self.pids() if done else []
            if pids:
                self.done_at_kill = done
                self.killed = pids[0]
                os.kill(self.killed, signal.SIGKILL)
                return
            time.sleep(0.02)

    def join(self):
        self.thread.join()
        assert self.killed is not None, "no worker was killed"
        assert self.done_at_kill < N_SAMPLES, "the run had finished before the kill"


def descendants(match):
    return [p.pid for p in psutil.Process().children(recursive=True) if match(" ".join(_cmdline(p)))]


def _cmdline(process):
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def test_two_local_workers_equal_one_process_even_when_one_is_killed(single_run, tmp_path):
    out = tmp_path / "loky"
    killer = Killer(out, lambda: descendants(lambda cmd: "loky" in cmd and "resource_tracker" not in cmd))
    run_cli(out, "--workers", "2")
    killer.join()
    assert_same_tables(single_run, out)
    config = json.loads((out / "run.json").read_text())
    assert config["parallel"]["backend"] == "loky" and config["parallel"]["workers"] == 2
    assert config["parallel"]["retries"] >= 1          # loky stops the pool when a worker dies: one more round
    assert config["timing"]["windows"] >= 4 * (N_SAMPLES - killer.done_at_kill)


def test_killed_driver_resumes_with_the_same_command_and_its_workers_end(single_run, tmp_path):
    out = tmp_path / "driver"
    driver = subprocess.Popen([sys.executable, "-m", "occbench", *ARGS, "--out", str(out), "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while driver.poll() is None and time.time() < deadline and not list((out / "chunks").glob("*.done")):
        time.sleep(0.02)
    workers = [p for p in psutil.Process(driver.pid).children(recursive=True)
               if "LokyProcess" in " ".join(_cmdline(p))]
    driver.kill()
    driver.wait()
    done = len(list((out / "chunks").glob("*.done")))
    assert 1 <= done < N_SAMPLES and workers
    _, alive = psutil.wait_procs(workers, timeout=30)    # they watch the driver and quit without it
    assert not alive
    run_cli(out, "--workers", "2")
    assert_same_tables(single_run, out)
    assert json.loads((out / "run.json").read_text())["resumed"] == 1


def test_dask_cluster_with_a_killed_worker_gives_the_same_tables(single_run, tmp_path):
    from distributed import Client, LocalCluster
    out = tmp_path / "dask"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        worker_pids = list(client.run(os.getpid).values())
        killer = Killer(out, lambda: worker_pids[:1])
        run_cli(out, "--backend", "dask", "--scheduler", cluster.scheduler_address)
        killer.join()
        assert killer.killed not in client.run(os.getpid).values()    # the nanny started a new worker
    assert_same_tables(single_run, out)
    assert json.loads((out / "run.json").read_text())["parallel"]["backend"] == "dask"


def test_ray_local_instance_with_a_killed_worker_gives_the_same_tables(single_run, tmp_path):
    import ray
    out = tmp_path / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        killer = Killer(out, lambda: descendants(lambda cmd: cmd.startswith("ray::PoolActor")))
        run_cli(out, "--backend", "ray", "--workers", "2")
        killer.join()
    finally:
        ray.shutdown()
    assert_same_tables(single_run, out)
    assert json.loads((out / "run.json").read_text())["parallel"]["backend"] == "ray"


def test_options_are_checked_before_anything_runs(monkeypatch):
    assert ScaleOut.from_options(workers=1) is None          # the ordinary serial run
    assert ScaleOut.from_options(devices="cpu,cpu").workers == 2
    with pytest.raises(UserError, match="--devices"):
        ScaleOut.from_options(devices="cuda:0,gpu7")
    with pytest.raises(UserError, match="--scheduler .*only for --backend dask"):
        ScaleOut.from_options(workers=2, scheduler="tcp://127.0.0.1:8786")
    monkeypatch.setitem(sys.modules, "distributed", None)     # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'occbench\[dask\]'"):
        ScaleOut.from_options(backend="dask")


def test_worker_loss_is_told_apart_from_an_error_in_the_task():
    class TerminatedWorkerError(Exception):
        pass
    try:
        try:
            raise TerminatedWorkerError("worker 123 was killed")
        except TerminatedWorkerError as inner:
            raise RuntimeError("joblib: a task failed") from inner
    except RuntimeError as err:
        wrapped = err
    assert _worker_lost(wrapped)
    assert not _worker_lost(ValueError("a bug in the evaluation"))


BUILDER = """
import occbench
from occbench.adapters import Outputs
PARE = occbench.load_model("pare-demo", device="cpu")


def build():
    outputs = Outputs(form="smpl", rotation="rotmat")
    return occbench.wrap_model(PARE.regress, name="mine", input_size=96, outputs=outputs)
"""


def test_workers_rebuild_zoo_and_builder_models_by_name_and_get_other_models_whole(tmp_path, monkeypatch):
    from occbench.plugins import load_any_model
    zoo = load_any_model("pare-demo", device="cpu")
    recipe = model_recipe(zoo)
    assert isinstance(recipe, ModelRecipe) and recipe.name == "pare-demo"
    assert model_digest(recipe.build("cpu")) == model_digest(zoo)

    (tmp_path / "my_model.py").write_text(BUILDER)
    monkeypatch.chdir(tmp_path)
    outside = load_any_model("my_model.py:build", device="cpu")
    recipe = model_recipe(outside)
    assert recipe.name == f"{tmp_path / 'my_model.py'}:build"      # found from any working directory
    monkeypatch.chdir(tmp_path.parent)
    assert model_digest(recipe.build("cpu")) == model_digest(outside)

    zoo.provenance = {}                    # as if made by hand: shipped whole
    shipped = model_recipe(zoo)
    assert isinstance(shipped, PickledModel)
    assert model_digest(shipped.build("cpu")) == model_digest(zoo)

    changed = load_any_model("pare-demo", device="cpu")
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)   # weights changed after loading: the rebuilt model differs
    with pytest.raises(UserError, match="differs from the driver's model"):
        model_recipe(changed).build("cpu")

"""Chunks/s and windows/s of a run on 1 and 2 local (loky) workers, and the per-task overhead with Dask
(issue 17, "Figures").

(a) the same run (pare-demo, occsens40, demo set, one sample per chunk) evaluated by the ordinary single
    process (--workers 1) and by 2 loky workers, each with one torch thread: end-to-end wall time (worker
    start and model load included) and the steady rate measured from the chunks' .done times once every
    worker has finished its first chunk;
(b) Dask (a LocalCluster of 1 worker, one thread): a task that carries the run's job but evaluates nothing
    (the round trip: scheduling, shipping the job, the answer), and the first chunk's extra time over a
    steady chunk (the worker loading the model and building its context, once per worker and run).

    python bench/bench_parallel.py                       # 8 samples x 32 windows
    python bench/bench_parallel.py --samples 16 --windows 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed_run(model, dataset, out, args, scale):
    from occbench.engine import run_protocol
    start = time.time()
    run_protocol(model, dataset, "occsens40", out, limit=args.samples, max_windows=args.windows,
                 chunk_samples=1, batch_size=args.batch_size, memory_format="contiguous", quiet=True,
                 scale=scale)
    wall = time.time() - start
    done = sorted(p.stat().st_mtime for p in (Path(out) / "chunks").glob("*.done"))
    return wall, done


def steady_rate(done, workers):
    """Chunks per second between the ``workers``-th and the last completion (start-up left out)."""
    first = done[workers - 1]
    return (len(done) - workers) / max(done[-1] - first, 1e-9)


def noop_task(job, chunk):
    """A task with the real job as its argument that evaluates nothing: the scheduling round trip."""
    import os
    return os.getpid()


def dask_overhead(model, dataset, folder, args):
    from distributed import Client, LocalCluster

    from occbench import parallel
    from occbench.engine import run_protocol
    run = run_protocol(model, dataset, "occsens40", folder / "ref", limit=1, max_windows=1, chunk_samples=1,
                       batch_size=args.batch_size, memory_format="contiguous", quiet=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        job = parallel.ChunkJob(token="bench", run_dir=str(run), run_config={}, model=parallel.model_recipe(model),
                                dataset=parallel.portable_dataset(dataset), protocol=None, input_size=0, seed=0,
                                batch_size=1, precision="fp32", memory_format="contiguous", pelvis="h36m-root")
        shipped = client.scatter(job, broadcast=True, hash=False)    # as parallel.execute does
        pids = client.gather(client.map(noop_task, [shipped] * 2, [(i, 0, 1) for i in range(2)], pure=False))
        assert os.getpid() not in pids, "the no-op tasks ran in the driver"
        start = time.perf_counter()
        for i in range(args.tasks):       # one at a time: the latency of a task, not the throughput
            client.gather(client.map(noop_task, [shipped], [(100 + i, 0, 1)], pure=False))
        round_trip = (time.perf_counter() - start) / args.tasks
        scale = parallel.ScaleOut(workers=1, backend="dask", scheduler=cluster.scheduler_address)
        start = time.time()
        timed_run(model, dataset, folder / "dask", args, scale)
    done = sorted(p.stat().st_mtime for p in (folder / "dask" / "chunks").glob("*.done"))
    steps = [b - a for a, b in zip(done, done[1:])]
    first = done[0] - start
    return round_trip, first, statistics.median(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="demo samples = chunks")
    parser.add_argument("--windows", type=int, default=32, help="windows per sample")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=20, help="no-op Dask tasks timed")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from occbench.data import open_dataset
    from occbench.parallel import ScaleOut
    from occbench.zoo import load_model
    model = load_model("pare-demo", device="cpu")
    dataset = open_dataset("demo")
    windows = args.samples * args.windows
    print(f"pare-demo, occsens40, demo set: {args.samples} chunks of 1 sample x {args.windows} windows, "
          f"batch {args.batch_size}, one torch thread per worker")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rates = {}
        for workers in (1, 2):
            scale = ScaleOut.from_options(workers=workers)      # 1: the ordinary single-process run
            wall, done = timed_run(model, dataset, folder / f"w{workers}", args, scale)
            rates[workers] = steady_rate(done, workers)
            label = "1 process (--workers 1)" if scale is None else f"{workers} loky workers     "
            print(f"  {label}: end to end {wall:6.1f} s = {args.samples / wall:5.2f} chunks/s, "
                  f"{windows / wall:6.1f} windows/s | steady {rates[workers]:5.2f} chunks/s, "
                  f"{rates[workers] * args.windows:6.1f} windows/s")
        print(f"  steady ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}")
        round_trip, first, steady = dask_overhead(model, dataset, folder, args)
        print(f"Dask, 1 worker: task round trip with the job, nothing evaluated: {1000 * round_trip:.0f} ms; "
              f"first chunk done after {first:.1f} s vs {steady:.2f} s per steady chunk "
              f"(model load + context, once per worker and run, plus cluster connection: "
              f"{first - steady:.1f} s)")


if __name__ == "__main__":
    main()

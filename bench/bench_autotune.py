"""Windows/s of the demo's main job with ``--batch-size auto`` on a busy machine vs a fixed good batch.

    .venv/bin/python bench/bench_autotune.py [--samples 2] [--rounds 2] [--burners 1] [--threads N]

A CPU burner process (a busy Python loop per ``--burners``) runs beside the whole benchmark. Each round runs
occsens40-dense with pare-demo on the first ``--samples`` demo samples twice: once with the autotune (a fresh
cache each round, so the tuning itself runs under load and its cost counts) and once at the fixed batch
``--fixed`` (default 32, the CPU default). Each arm keeps its best round; the figure is auto / fixed
(goal >= 0.9), with the batch sizes the autotune chose and its tuning cost in CPU seconds.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path


def burn(stop):
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 31 + 7) % 1_000_003


def one_run(model, dataset, out, samples, batch_size, threads, cache):
    from occbench.engine import run_protocol
    os.environ["OCCBENCH_CACHE_DIR"] = str(cache)
    start = time.perf_counter()
    run_dir = run_protocol(model, dataset, "occsens40-dense", out, batch_size=batch_size, threads=threads,
                           limit=samples, progress=False, quiet=True)
    wall = time.perf_counter() - start
    config = json.loads((Path(run_dir) / "run.json").read_text())
    return config["timing"]["windows"] / wall, config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--burners", type=int, default=1)
    parser.add_argument("--fixed", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="default: occbench's rule")
    args = parser.parse_args(argv)

    import occbench
    from occbench.runner import default_threads
    model = occbench.load_model("pare-demo", device="cpu")
    dataset = occbench.open_dataset("demo")
    threads = args.threads or default_threads()
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=burn, args=(stop,), daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    best = {"auto": 0.0, "fixed": 0.0}
    chosen, tuning = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.rounds):
                cache = Path(tmp) / f"cache{round_}"
                cache.mkdir()
                speed, config = one_run(model, dataset, Path(tmp) / f"auto{round_}", args.samples, "auto",
                                        threads, cache)
                best["auto"] = max(best["auto"], speed)
                chosen.append(config["batch_size"])
                tuning.append(config["autotune"]["tuning_s"])
                speed, _ = one_run(model, dataset, Path(tmp) / f"fixed{round_}", args.samples, args.fixed,
                                   threads, cache)
                best["fixed"] = max(best["fixed"], speed)
                print(f"round {round_ + 1}: auto {best['auto']:.1f} windows/s (batch {chosen[-1]}, tuning "
                      f"{tuning[-1]:.2f} s CPU), fixed batch {args.fixed} {best['fixed']:.1f} windows/s", flush=True)
    finally:
        stop.set()
        for b in burners:
            b.join(timeout=5)
    print(f"{args.burners} burner(s), {threads} thread(s), {args.samples} samples x 576 windows: "
          f"auto / fixed = {best['auto'] / best['fixed']:.2f} (goal >= 0.9); batches chosen {chosen}; "
          f"tuning {max(tuning):.2f} s CPU at most")


if __name__ == "__main__":
    main()

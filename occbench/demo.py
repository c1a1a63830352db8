"""``make demo``: the main job on the embedded demo set, then an HTML report under reports/demo/.

    python -m occbench.demo [--out-runs runs/demo] [--report reports/demo] [--limit N] [--workers N]

Runs the shipped demo model (trained by ``make demo-weights`` on synthetic stand-in data) on the demo set
with the AdvOcc Occ@80 attack and PARE's dense occlusion sensitivity protocol, then writes the report.
The runs use ``--incremental`` (only what each window changes is recomputed): the same windows and numbers up
to fp32 rounding (within 4e-4 mm of a plain run on the demo), bit-identical from run to run, fewer FLOPs.
Without shipped weights it falls back to a clearly labelled untrained PARE-R50.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_MODEL = "pare-demo"
PROTOCOLS = ("advocc80", "occsens40-dense")


def demo_model_args() -> dict:
    """The shipped demo model, or an untrained stand-in when no demo weights are bundled."""
    from occbench.models import model_names
    from occbench.zoo import find_checkpoint
    if DEMO_MODEL in model_names():
        try:
            find_checkpoint(DEMO_MODEL)
            return {"name": DEMO_MODEL, "weights": "checkpoint", "options": {}}
        except FileNotFoundError:
            pass
    print("note: no demo weights bundled; using an untrained PARE-R50 (random weights, numbers mean nothing)")
    return {"name": "pare", "weights": "random", "options": {"backbone": "resnet50"}}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-runs", default="runs/demo")
    parser.add_argument("--report", default="reports/demo")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes of one torch thread each (default: the CPUs this process may use, at "
                             "most 4); the numbers are the same for any count")
    args = parser.parse_args(argv)

    from occbench.data import open_dataset
    from occbench.engine import run_protocol
    from occbench.protocol import load_protocol
    from occbench.report import write_report
    from occbench.parallel import ScaleOut
    from occbench.runner import default_threads
    from occbench.zoo import load_model

    started = time.time()
    spec = demo_model_args()
    model = load_model(spec["name"], weights=spec["weights"], device="cpu", **spec["options"])
    dataset = open_dataset("demo")
    # One thread per process: two threads of small convolutions scale poorly and collapse when another job
    # holds a core (measured: 6m37s with two threads vs 3m01s with one, same busy machine), while one-thread
    # workers share nothing and give the numbers of a serial one-thread run, bit for bit.
    workers = args.workers or min(4, default_threads())
    scale = ScaleOut.from_options(workers=workers, threads=1)
    run_dirs = []
    for name in PROTOCOLS:
        out = Path(args.out_runs) / f"{spec['name']}-{name}"
        print(f"== {spec['name']} / {name} on the demo set ({len(dataset)} samples) -> {out}")
        run_dirs.append(run_protocol(model, dataset, load_protocol(name), out, seed=0, limit=args.limit,
                                     threads=1, incremental=True, scale=scale))
    evaluated = time.time()
    index = write_report(run_dirs, args.report, title="occbench demo report")
    print(f"demo finished in {time.time() - started:.0f} s (runs {evaluated - started:.0f} s, "
          f"report {time.time() - evaluated:.0f} s)")
    print(f"report: {index.resolve()}")
    return index


if __name__ == "__main__":
    main()

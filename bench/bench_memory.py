"""Peak memory of a run against its number of chunks: the slope must be ~0 (memory does not grow with the dataset).

Each point is a fresh process running one protocol on the first N chunks of the demo set; the script prints its
peak RSS (``ru_maxrss``) and the least-squares slope in MB per chunk.

    python bench/bench_memory.py                      # pare-demo, occsens40-dense, 1/2/5/10 chunks
    python bench/bench_memory.py --chunks 1 2 5 10 20 --protocol advocc80
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

CHILD = textwrap.dedent("""
    import json, resource, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(1)
    import occbench
    model_name, protocol, samples, chunk, batch, out = sys.argv[1:7]
    model = occbench.load_model(model_name, device="cpu")
    data = occbench.open_dataset("demo")
    occbench.run_protocol(model, data, protocol, out, limit=int(samples), chunk_samples=int(chunk),
                          batch_size=int(batch), memory_format="contiguous", progress=False, quiet=True)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def peak_rss(model: str, protocol: str, samples: int, chunk: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-c", CHILD, model, protocol, str(samples), str(chunk),
                                 str(batch), f"{tmp}/run"], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pare-demo")
    parser.add_argument("--protocol", default="occsens40-dense")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--chunk-samples", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    rows = []
    print(f"{args.model} | {args.protocol} | {args.chunk_samples} sample(s) per chunk | batch {args.batch_size}")
    print(f"{'chunks':>7s} {'samples':>8s} {'peak RSS (MB)':>14s}")
    for chunks in args.chunks:
        samples = chunks * args.chunk_samples
        rss = peak_rss(args.model, args.protocol, samples, args.chunk_samples, args.batch_size)
        rows.append((chunks, rss))
        print(f"{chunks:7d} {samples:8d} {rss:14.1f}", flush=True)
    x, y = np.array(rows, dtype=np.float64).T
    slope = np.polyfit(x, y, 1)[0] if len(rows) > 1 else float("nan")
    print(f"slope: {slope:+.2f} MB per chunk ({100 * slope / y[0]:+.2f} % of the 1-chunk peak per chunk)")


if __name__ == "__main__":
    main()

"""Windows/s with and without incremental inference (``run --incremental``) on occsens40-dense, next to the
FLOP bound: the share of each layer group's multiply-adds that falls inside the changed regions.

For each model: the occsens40-dense windows of one random crop, in the engine's batches (consecutive
windows of the sample), through (a) the model's own forward ``regress(preprocess(images))`` and (b)
:class:`occbench.models.incremental.IncrementalRunner` (the clean activations cached once, not timed: the
engine computes the clean forward anyway). (a) is timed in both memory formats and the faster one is the
baseline. Times are this process's CPU time (``time.process_time``, which
other processes on a shared machine disturb far less than wall time) and wall time, best of ``--rounds``.

FLOP bound: multiply-adds of convolutions, transposed convolutions and linear layers, counted per layer
group (stem, layer1..4, head) over the same windows: in the full forward, and in the incremental one when
it never switches to full maps (only the exact changed regions, grown per layer, are computed: the bound
of any exact incremental scheme with this batching) and as run (``full_fraction`` 0.6).

    python bench/bench_incremental.py                     # PARE-R50 at 224 (random weights) and pare-demo
    python bench/bench_incremental.py --models pare-demo --windows 576 --batch 32
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from occbench import occluders
from occbench.models.incremental import IncrementalRunner, supports_incremental
from occbench.protocol import load_protocol
from occbench.zoo import load_model

MODELS = {"pare-r50": ("pare", {"backbone": "resnet50"}), "pare-demo": ("pare-demo", {}),
          "spin": ("spin", {}), "3dnbf-reg": ("3dnbf-reg", {})}
GROUPS = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


def group_of(name: str) -> str:
    for part in name.split("."):
        if part in GROUPS[1:5]:
            return part
    return "stem" if name.split(".")[-1] == "conv1" and "layer" not in name else "head"


class MacCounter:
    """Multiply-adds of the conv / transposed conv / linear modules called while it is attached."""

    def __init__(self, model: nn.Module) -> None:
        self.counts: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]

    def _hook(self, name):
        def hook(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                macs = output.numel() * module.in_channels // module.groups * k
            elif isinstance(module, nn.ConvTranspose2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                macs = inputs[0].numel() * module.out_channels // module.groups * k
            else:
                macs = output.numel() * module.in_features
            self.counts[name] = self.counts.get(name, 0) + macs
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def by_group(counts: dict) -> dict:
    out = dict.fromkeys(GROUPS, 0)
    for name, macs in counts.items():
        out[group_of(name)] += macs
    return out


def windows_of(model, count: int, batch: int, device: str):
    """(clean (1,3,S,S), occluded batches): ``count`` occsens40-dense windows spread evenly over the grid."""
    size = model.input_size
    table = load_protocol("occsens40-dense").windows("bench", size, 0)
    n = len(table["window"])
    pick = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    clean = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    batches = []
    for start in range(0, len(pick), batch):
        rows = pick[start:start + batch]
        batches.append(occluders.compose(clean.expand(len(rows), -1, -1, -1),
                                         {k: v[rows] for k, v in table.items()}))
    return clean, batches


def timed(runs: dict, rounds: int) -> dict:
    """{name: (best windows/s in CPU time, in wall time)} for ``runs`` {name: (fn, batches)}, the runs
    interleaved round by round so that a busy moment of the machine hits all of them alike."""
    best = {name: (0.0, 0.0) for name in runs}
    for _ in range(rounds):
        for name, (fn, batches) in runs.items():
            n = sum(len(b) for b in batches)
            cpu, wall = time.process_time(), time.perf_counter()
            for images in batches:
                fn(images)
            if batches[0].is_cuda:
                torch.cuda.synchronize()
            speed = (n / (time.process_time() - cpu), n / (time.perf_counter() - wall))
            best[name] = tuple(max(a, b) for a, b in zip(best[name], speed))
    return best


def bench(key: str, count: int, batch: int, rounds: int, full_fraction: float, device: str) -> dict:
    name, options = MODELS[key]
    model = load_model(name, weights="random", device=device, **options).eval()
    clean, batches = windows_of(model, count, batch, device)
    runner = IncrementalRunner(model, full_fraction=full_fraction)
    with torch.inference_mode():
        cache = runner.cache(clean)

        def full(images):
            return model.regress(model.preprocess(images))

        def incremental(images):
            return runner.regress(cache, np.zeros(len(images), np.int64), images)

        def full_channels_last(images):
            return full(images.contiguous(memory_format=torch.channels_last))

        def switch(fmt):
            def run(images):
                model.to(memory_format=fmt)
            return run

        full(batches[0]), incremental(batches[0])                     # warm-up
        one = batches[:1]
        speeds = timed({"contiguous": (full, batches), "to_cl": (switch(torch.channels_last), one),
                        "channels_last": (full_channels_last, batches),
                        "to_contiguous": (switch(torch.contiguous_format), one),
                        "incremental": (incremental, batches)}, rounds)
        contiguous, channels_last = speeds["contiguous"], speeds["channels_last"]
        full_speed = max(contiguous, channels_last)                  # the faster memory format (by CPU time)
        inc_speed = speeds["incremental"]

        counter = MacCounter(model)
        for images in batches:
            full(images)
        full_macs = by_group(counter.counts)
        executed = {}
        for fraction in (1.1, full_fraction):   # 1.1: never switches to full maps (the exact changed regions)
            counter.counts, runner.macs, runner.full_fraction = {}, {}, fraction
            for images in batches:
                incremental(images)
            executed[fraction] = by_group({**counter.counts, **{k: counter.counts.get(k, 0) + v
                                                                for k, v in runner.macs.items()}})
        counter.close()
    regions = executed[1.1]
    return {"model": key, "config": runner.config, "windows": sum(len(b) for b in batches), "batch": batch,
            "format": "contiguous" if full_speed is contiguous else "channels_last",
            "full_cpu": full_speed[0], "full_wall": full_speed[1], "inc_cpu": inc_speed[0],
            "inc_wall": inc_speed[1], "share": {g: regions[g] / full_macs[g] for g in GROUPS if full_macs[g]},
            "bound": sum(full_macs.values()) / sum(regions.values()),
            "executed": sum(full_macs.values()) / sum(executed[full_fraction].values()),
            "declared": supports_incremental(model).measured_gain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["pare-r50", "pare-demo"], choices=sorted(MODELS))
    parser.add_argument("--windows", type=int, default=None,
                        help="windows per model, spread over the grid (default: 48 for PARE-R50, 576 else)")
    parser.add_argument("--batch", type=int, default=16, help="windows per forward (the engine's batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full-fraction", type=float, default=0.6)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA only the wall-time figures count)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"occsens40-dense, batch {args.batch}, {args.threads} thread(s), {args.device}, random weights, "
          f"best of {args.rounds}")
    header = (f"{'model':<10} {'config':<20} {'win':>4} {'full w/s cpu':>12} {'inc w/s cpu':>11} {'gain cpu':>8} "
              f"{'gain wall':>9} {'bound':>6} {'run':>5}  share of MACs in changed regions")
    print(header)
    for key in args.models:
        count = args.windows or (48 if key in ("pare-r50", "spin", "3dnbf-reg") else 576)
        r = bench(key, count, args.batch, args.rounds, args.full_fraction, args.device)
        shares = " ".join(f"{g} {100 * s:.0f}%" for g, s in r["share"].items())
        print(f"{r['model']:<10} {r['config']:<20} {r['windows']:>4} {r['full_cpu']:>12.2f} {r['inc_cpu']:>11.2f} "
              f"{r['inc_cpu'] / r['full_cpu']:>7.2f}x {r['inc_wall'] / r['full_wall']:>8.2f}x "
              f"{r['bound']:>5.2f}x {r['executed']:>4.2f}x  {shares}")
        print(f"{'':<10} wall: full {r['full_wall']:.2f} w/s ({r['format']}), incremental {r['inc_wall']:.2f} w/s; "
              f"gain declared in models/incremental.py: {r['declared']}")


if __name__ == "__main__":
    main()

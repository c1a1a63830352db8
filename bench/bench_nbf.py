"""3DNBF speed (issue 5, "Speed"): regressor-only images/s and Neural Body Volume fitting time per image.

    python bench/bench_nbf.py                                   # batch 1 and 16, 4 + 8 fitting steps, CPU
    python bench/bench_nbf.py --device cuda --stage1 40 --stage2 80 --json out.json

Random weights (speed does not depend on them), the stand-in body, 858 kernels, 320 px input (80x80 feature
map), the 180-degree hypothesis fitted as well (``flip="both"``, the official AdvOcc setting, so 2 x batch
volumes are optimised). With fewer steps than the official 40 + 80, the fitting time is also reported scaled
linearly to 120 steps (the per-step cost is constant; the fixed part -- start losses, candidate choice --
is measured separately and not scaled). The paper reports ~1.7 images/s at batch 32 on 4 Titan Xp GPUs.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def regressor_rate(model, device, batch: int, repeats: int) -> float:
    """Images/s of the regressor forward (network only, no body model) at ``batch``."""
    from occbench.models.nbf import NBFRegressor
    images = torch.rand(batch, 3, 224, 224, device=device)
    with torch.no_grad():
        NBFRegressor.regress(model, model.preprocess(images))                    # warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            NBFRegressor.regress(model, model.preprocess(images))
        _sync(device)
    return batch * repeats / (time.perf_counter() - start)


def fitting_time(model, device, batch: int, stage1: int, stage2: int) -> dict:
    """Seconds per image of :func:`occbench.models.nbf_fit.fit` on the regressor's own outputs."""
    from dataclasses import replace

    from occbench.models import nbf_fit
    from occbench.models.nbf import NBFRegressor
    images = torch.rand(batch, 3, 224, 224, device=device)
    with torch.no_grad():
        rotmat, betas, cam, extras = NBFRegressor.regress(model, model.preprocess(images))
    volume = model.volume()
    timings = {}
    for steps in ((0, 0), (stage1, stage2)):
        options = replace(model.fit_options, stage1_steps=steps[0], stage2_steps=steps[1])
        _sync(device)
        start = time.perf_counter()
        nbf_fit.fit(model.body_model, volume, extras["feature_map"], rotmat, betas, cam, options)
        _sync(device)
        timings[steps] = time.perf_counter() - start
    fixed = timings[(0, 0)]
    per_step = (timings[(stage1, stage2)] - fixed) / max(stage1 + stage2, 1)
    return {"batch": batch, "steps": [stage1, stage2], "seconds": timings[(stage1, stage2)],
            "seconds_per_image": timings[(stage1, stage2)] / batch,
            "fixed_seconds": fixed, "seconds_per_step": per_step,
            "seconds_per_image_at_120_steps": (fixed + 120 * per_step) / batch}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--stage1", type=int, default=4, help="fitting steps of stage 1 (official: 40)")
    parser.add_argument("--stage2", type=int, default=8, help="fitting steps of stage 2 (official: 80)")
    parser.add_argument("--repeats", type=int, default=2, help="regressor forwards timed per batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.simplefilter("ignore")
    from occbench.zoo import load_model
    model = load_model("3dnbf", weights="random", device=device)
    result = {"device": str(device), "cuda_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else None, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "weights": "random", "body": "stand-in" if model.body_model.is_standin
              else "smpl", "input_size": model.input_size, "fit_options": vars(model.fit_options),
              "regressor": [], "fitting": []}
    for batch in args.batch_sizes:
        rate = regressor_rate(model, device, batch, args.repeats)
        result["regressor"].append({"batch": batch, "images_per_second": rate})
        print(f"regressor  batch {batch:3d}: {rate:8.2f} images/s", flush=True)
    for batch in args.batch_sizes:
        fit = fitting_time(model, device, batch, args.stage1, args.stage2)
        result["fitting"].append(fit)
        print(f"fitting    batch {batch:3d}: {fit['seconds_per_image']:8.2f} s/image with {args.stage1}+"
              f"{args.stage2} steps ({fit['seconds_per_step']:.3f} s/step for the batch, fixed "
              f"{fit['fixed_seconds']:.2f} s); scaled to 40+80 steps: "
              f"{fit['seconds_per_image_at_120_steps']:.2f} s/image", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()

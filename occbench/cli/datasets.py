"""``occbench datasets ...``: which datasets occbench knows and where they go, the synthetic sets, a sample viewer."""
from __future__ import annotations

import json

import click


@click.group("datasets")
def datasets():
    """Datasets: list them, make the synthetic demo/training sets, look at a sample."""


@datasets.command("list")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Datasets folder (default: $OCCBENCH_DATASETS_DIR, ~/.occbench/datasets).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dataset.")
def list_datasets(root, as_json):
    """Known datasets, the folder each is expected in, and whether it was found."""
    from pathlib import Path

    from occbench.data.catalog import KNOWN_DATASETS, dataset_status, known_dataset_names

    for name in known_dataset_names():
        spec_root = None
        if root is not None and name in KNOWN_DATASETS:
            spec_root = Path(root) / KNOWN_DATASETS[name].folder
        status = dataset_status(name, spec_root)
        if as_json:
            click.echo(json.dumps(status))
            continue
        mark = "found  " if status["found"] else "missing"
        click.echo(f"{name:15s} {mark} {status['root']}")
        click.echo(f"{'':15s}         {status['what']}")
        if not status["found"]:
            click.echo(f"{'':15s}         get it from {status['source']}")


@datasets.command("make-demo")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write the demo set here instead of the cache (occbench.assets.cache_dir()/demo).")
def make_demo(out):
    """Generate the embedded demo set (32 synthetic stand-in samples, fixed seed; deterministic)."""
    from occbench.data.synthetic import DEMO_N, DEMO_SEED, ensure_demo, make_synthetic

    folder = make_synthetic(out, n=DEMO_N, seed=DEMO_SEED, split_name="demo") if out else ensure_demo()
    click.echo(f"demo set: {folder} ({DEMO_N} samples, seed {DEMO_SEED})")


@datasets.command("make-synthetic")
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of samples to render.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder (replaced).")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Random seed; the demo set uses its own fixed seed, so other seeds keep it held out.")
@click.option("--name", "split_name", default="synthetic-train", show_default=True,
              help="Split name recorded in dataset.json.")
@click.option("--image-size", type=click.IntRange(min=64), default=256, show_default=True,
              help="Rendered image side in px.")
@click.option("--limb-swing", type=click.FloatRange(min=0), default=None,
              help="Std (rad) of the frontal-plane swing of arms and hips (default: the demo set's).")
@click.option("--joint-noise", type=click.FloatRange(min=0), default=None,
              help="Std (rad) of small all-axis joint rotations (default: the demo set's).")
def make_synthetic_cmd(n, out, seed, split_name, image_size, limb_swing, joint_noise):
    """Render a synthetic training/evaluation set (SPIN npz + images + part labels) into OUT."""
    from occbench.data.synthetic import DEMO_SEED, make_synthetic

    if seed == DEMO_SEED:
        click.echo(f"warning: seed {seed} is the demo set's seed; the demo set will not be held out", err=True)
    from occbench.data.synthetic import JOINT_NOISE, LIMB_SWING
    folder = make_synthetic(out, n=n, seed=seed, split_name=split_name, image_size=image_size, progress=True,
                            limb_swing=LIMB_SWING if limb_swing is None else limb_swing,
                            joint_noise=JOINT_NOISE if joint_noise is None else joint_noise)
    click.echo(f"synthetic set: {folder}")


@datasets.command("show")
@click.argument("name_or_path")
@click.option("--index", "-i", type=int, default=0, show_default=True, help="Sample index.")
@click.option("--out", type=click.Path(dir_okay=False), default="sample.png", show_default=True,
              help="PNG to write: the crop with its GT 2D joints.")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Dataset root folder.")
@click.option("--scale", "upscale", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Upscale the 224 px crop for viewing.")
def show(name_or_path, index, out, root, upscale):
    """Write sample INDEX of a dataset as a PNG: the crop with GT 2D joints (hollow = not labelled)."""
    import cv2
    import numpy as np

    from occbench.data import open_dataset

    ds = open_dataset(name_or_path, root=root)
    sample = ds[index]
    image = cv2.resize(cv2.cvtColor(sample.crop, cv2.COLOR_RGB2BGR), None, fx=upscale, fy=upscale,
                       interpolation=cv2.INTER_NEAREST)
    if sample.joints2d is not None:
        draw_skeleton(image, sample.joints2d * upscale, sample.joints2d_valid)
    cv2.imwrite(out, image)
    info = {"dataset": ds.name, "index": index, "sample_id": sample.sample_id, "image": sample.image_path,
            "gender": sample.gender, "out": out}
    if sample.joints3d is not None:
        info["joints3d_extent_m"] = np.ptp(sample.joints3d, axis=0).round(3).tolist()
    click.echo(json.dumps(info))


# LSP-14 bones: legs, arms, neck-head, shoulders-neck, hips
_BONES = ((0, 1), (1, 2), (3, 4), (4, 5), (6, 7), (7, 8), (9, 10), (10, 11), (12, 13), (8, 12), (9, 12),
          (2, 3), (2, 8), (3, 9))
_RIGHT = {0, 1, 2, 6, 7, 8}


def draw_skeleton(image, joints2d, valid) -> None:
    """Draw LSP-14 joints (x, y px) on a BGR image in place; right side red, left blue."""
    import cv2
    import numpy as np

    pts = np.round(np.asarray(joints2d)).astype(int)
    valid = np.ones(len(pts), bool) if valid is None else np.asarray(valid, bool)
    for a, b in _BONES:
        if valid[a] and valid[b]:
            cv2.line(image, tuple(pts[a]), tuple(pts[b]), (0, 220, 0), 1, cv2.LINE_AA)
    for j, p in enumerate(pts):
        color = (40, 40, 230) if j in _RIGHT else (230, 120, 30)
        cv2.circle(image, tuple(p), 3, color, -1 if valid[j] else 1, cv2.LINE_AA)

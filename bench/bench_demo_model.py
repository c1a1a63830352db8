"""Evidence that the bundled demo model (``pare-demo``) learned something, on the held-out demo set.

1. Clean MPJPE of the demo model vs a constant "mean pose" predictor: the mean GT LSP-14 pose of the demo
   set itself (the best constant predictor of that set, so a conservative baseline), and the SMPL mean
   parameters (the model's ``init_pose`` / ``init_shape``). Target: the model at most half the mean pose.
2. Occlusion sensitivity on ``occsens40-dense`` (run through the engine; 576 windows per sample at every input
   size: at the demo model's 96 px the 40 px patch is 17 px and the 224 grid's positions are scaled): the mean
   per-sample-per-window MPJPE of windows whose centre lies on the body silhouette (the demo set's part
   labels, cropped like the images) vs windows whose centre lies off it; also vs windows that do not touch
   the body at all. Target: on / off >= 1.5. Also, per joint: the error of the joints a window hides (the
   engine's ``occluded`` flag) vs the same joints' clean error, and vs the joints left in view -- where the
   occlusion's effect concentrates (the mean over 14 joints dilutes it). And by the body region under the
   window's centre (torso, head, upper arms, forearms and hands, thighs, lower legs and feet): the rise over
   the clean error, and how much of it lies in the joints the window hides rather than in those left in view.
3. What the on / off ratio could reach if occlusion only cost information: the same windows with every joint a
   window hides given the error of the constant mean-pose predictor (or its clean error, when larger) and
   every other joint its clean error. A model that fails locally -- PARE's design goal -- cannot pass that
   figure by much; beyond it, a window must also damage joints it does not hide. And the clean error such a
   model would need for on / off to reach 1.5: with every joint at the same clean error c and every hidden
   joint at max(c, its mean-pose error), the largest c that still gives 1.5 on these windows.
4. The published protocol's view: ``advocc40`` (3DNBF's AdvOcc@40: the worst of a textured 40 px patch's
   positions per image, joints under the patch left out) on the same samples, as worst-window MPJPE / clean
   MPJPE, next to the same ratio of the official ResNet-50 models on real 3DPW (3DNBF Table 1). Without
   ``--dtd-root`` the textures are scikit-image's bundled images, and at 96 px the grid has 21 x 21 positions
   (20 x 20 at 224), so the comparison is of kind, not of value.

    python bench/bench_demo_model.py                      # bundled weights, all 32 demo samples
    python bench/bench_demo_model.py --checkpoint FILE --limit 8 --json out.json

The demo weights are trained on synthetic stand-in data; these numbers are not comparable to published ones.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from occbench import rundir


# Body regions over SMPL parts (a vertex belongs to the joint with its largest skinning weight, so part 16 is
# the upper arm, 18 the forearm, 1 the thigh, 4 the lower leg); part-label value = part + 1, 0 = background.
REGIONS = {"torso": (0, 3, 6, 9, 13, 14), "head": (12, 15), "upper arms": (16, 17),
           "forearms and hands": (18, 19, 20, 21, 22, 23), "thighs": (1, 2), "lower legs and feet": (4, 5, 7, 8, 10, 11)}
REGION_OF_LABEL = {0: "off body", **{part + 1: region for region, parts in REGIONS.items() for part in parts}}


# 3DNBF Table 1 (real 3DPW, ResNet-50 models): (3DPW MPJPE, 3DPW-AdvOcc@40 MPJPE) in mm.
PUBLISHED_ADVOCC40 = {"SPIN": (96.6, 203.5), "HMR-EFT": (89.5, 146.7), "PARE": (81.4, 126.5), "3DNBF": (79.8, 105.1)}


def worst_window_vs_clean(run_dir: Path) -> dict:
    """Headline worst-window and clean MPJPE of an advocc run (metrics.json) and their ratio."""
    headline = rundir.read_metrics(run_dir)["headline"]
    return {"advocc40_clean_mpjpe": headline["clean_mpjpe"], "advocc40_worst_mpjpe": headline["mpjpe"],
            "advocc40_worst_vs_clean": headline["mpjpe"] / headline["clean_mpjpe"]}


def part_labels(dataset, n: int) -> np.ndarray:
    """(n,224,224) uint8 part labels (0 = background, else SMPL part + 1) of the first n demo samples, cropped
    like the images, from the part-label PNGs."""
    import cv2

    from occbench.data.crop import crop_transform
    from occbench.train import _part_label_files

    files = _part_label_files(dataset)
    if files is None:
        raise SystemExit(f"{dataset.name}: no part labels (need a synthetic set)")
    out = np.zeros((n, 224, 224), np.uint8)
    for i in range(n):
        labels = cv2.imread(files[i], cv2.IMREAD_UNCHANGED)
        labels = labels[..., 0] if labels.ndim == 3 else labels
        r = dataset.records
        m = crop_transform(r.center[i], float(r.scale[i]), 224)
        out[i] = cv2.warpAffine(labels, m, (224, 224), flags=cv2.INTER_NEAREST, borderValue=0)
    return out


def mean_pose_baselines(model, dataset, n: int) -> dict:
    """MPJPE (mm) of two constant predictors over the first n samples."""
    from occbench.metrics import align_pelvis, mpjpe

    gt = torch.as_tensor(np.stack([dataset[i].joints3d for i in range(n)]))            # (n,14,3) aligned
    const = gt.mean(0, keepdim=True).expand_as(gt)
    out = {"mean_gt_pose_mpjpe": float(mpjpe(const, gt).mean()),
           "mean_gt_pose_joint_errors": mpjpe(const, gt).numpy()}                       # (n,14) mm
    head = getattr(model, "head", model)
    if hasattr(head, "init_pose"):
        from occbench.rotations import rot6d_to_rotmat
        rot = rot6d_to_rotmat(head.init_pose.reshape(-1, 6).float().cpu()).reshape(1, 24, 3, 3)
        body = model.body_model
        with torch.no_grad():
            res = body.to("cpu")(rotmat=rot, betas=head.init_shape.float().cpu())
        pred = align_pelvis(res.joints_lsp, dataset.pelvis, pelvis=res.joints_h36m[:, 0]) \
            if dataset.pelvis == "h36m-root" else align_pelvis(res.joints_lsp, dataset.pelvis)
        out["smpl_mean_params_mpjpe"] = float(mpjpe(pred.expand_as(gt), gt).mean())
        body.to(model.device)
    return out


def clean_error_for_local_ratio(window_of_row: np.ndarray, on_body_window: np.ndarray, hidden: np.ndarray,
                                lost_error: np.ndarray, target: float = 1.5) -> float:
    """Largest uniform clean error c (mm) at which a model that fails only locally reaches on / off = target.

    One entry per (window, joint) row: window_of_row (R,) int window code 0..W-1, hidden (R,) bool (the window
    hides the joint), lost_error (R,) mm (the joint's error once hidden, e.g. the mean-pose predictor's);
    on_body_window (W,) bool. Such a model has error c on every joint but max(c, lost_error) on hidden ones;
    its on / off ratio falls as c grows. NaN when even c -> 0 stays below target."""
    counts = np.bincount(window_of_row, minlength=len(on_body_window)).astype(np.float64)

    def ratio(c: float) -> float:
        per_window = np.bincount(window_of_row, np.where(hidden, np.maximum(lost_error, c), c),
                                 minlength=len(on_body_window)) / np.maximum(counts, 1)
        return per_window[on_body_window].mean() / per_window[~on_body_window].mean()

    low, high = 1e-3, float(max(lost_error.max(initial=0.0), 1.0))
    if ratio(low) < target:
        return float("nan")
    for _ in range(60):      # ratio(c) is non-increasing in c: bisect on a log scale
        mid = float(np.sqrt(low * high))
        low, high = (mid, high) if ratio(mid) >= target else (low, mid)
    return low


def sensitivity(run_dir: Path, input_size: int, labels: np.ndarray,
                mean_pose_joint_error: np.ndarray | None = None) -> dict:
    """On-body vs off-body window errors from an occsens run's joints.parquet.

    labels: (n,224,224) part labels (:func:`part_labels`; 0 = off the body). mean_pose_joint_error: (n,14) mm,
    the constant mean-pose predictor's per-joint error; adds the information-loss ceiling of the on / off
    ratio (module docstring, item 3). ``by_region``: windows and their mean error by the body region under
    the window's centre, and how much of the rise over clean is in the joints the window hides."""
    masks = labels > 0
    joints = pd.read_parquet(rundir.table_path(run_dir, "joints"),
                             columns=["sample_index", "window", "joint", "mpjpe", "visible", "occluded", "occ_cx",
                                      "occ_cy", "x0", "y0", "size"])
    joints = joints[joints["visible"]]
    clean_joint = joints[joints["window"] < 0].set_index(["sample_index", "joint"])["mpjpe"]
    windows = joints[joints["window"] >= 0]
    hidden = windows[windows["occluded"]]
    hidden_clean = clean_joint.loc[list(zip(hidden["sample_index"], hidden["joint"]))]
    joints = joints.copy()
    if mean_pose_joint_error is not None:
        own_clean = clean_joint.loc[list(zip(joints["sample_index"], joints["joint"]))].to_numpy()
        lost = np.maximum(mean_pose_joint_error[joints["sample_index"], joints["joint"]], own_clean)
        joints["ceiling"] = np.where(joints["occluded"] & (joints["window"] >= 0), lost, own_clean)
    else:
        joints["ceiling"] = np.nan
    per = joints.groupby(["sample_index", "window"]).agg(
        mpjpe=("mpjpe", "mean"), ceiling=("ceiling", "mean"), hidden=("occluded", "sum"), cx=("occ_cx", "first"),
        cy=("occ_cy", "first"), x0=("x0", "first"), y0=("y0", "first"), size=("size", "first")).reset_index()
    clean = per[per["window"] < 0].set_index("sample_index")["mpjpe"]
    per = per[per["window"] >= 0].copy()
    k = 224.0 / input_size            # occ_cx/occ_cy are in the model's input px
    on_centre, touches, region = [], [], []
    for row in per.itertuples():
        mask = masks[int(row.sample_index)]
        cx = int(np.clip(np.floor(row.cx * k), 0, 223))
        cy = int(np.clip(np.floor(row.cy * k), 0, 223))
        on_centre.append(bool(mask[cy, cx]))
        region.append(REGION_OF_LABEL.get(int(labels[int(row.sample_index), cy, cx]), "other"))
        # x0, y0, size are already in 224 px
        x0, y0 = int(max(0, np.floor(row.x0))), int(max(0, np.floor(row.y0)))
        x1, y1 = int(min(224, np.ceil(row.x0 + row.size))), int(min(224, np.ceil(row.y0 + row.size)))
        touches.append(bool(mask[y0:y1, x0:x1].any()))
    per["on_body"], per["touches_body"], per["region"] = on_centre, touches, region
    per["rise"] = per["mpjpe"] - clean.loc[per["sample_index"]].to_numpy()
    joint_rise = windows[["sample_index", "window", "occluded"]].copy()
    joint_rise["rise"] = windows["mpjpe"].to_numpy() - clean_joint.loc[
        list(zip(windows["sample_index"], windows["joint"]))].to_numpy()
    joint_rise = joint_rise.merge(per[["sample_index", "window", "region"]], on=["sample_index", "window"])
    by_region = {}
    for name, group in per.groupby("region", sort=False):
        rises = joint_rise[joint_rise["region"] == name]
        hidden_share = float(rises.loc[rises["occluded"], "rise"].sum() / rises["rise"].sum()) \
            if rises["rise"].sum() > 0 else float("nan")
        by_region[name] = {"windows": int(len(group)), "mpjpe": float(group["mpjpe"].mean()),
                           "rise_over_clean": float(group["rise"].mean()),
                           "hidden_joints_per_window": float(group["hidden"].mean()),
                           "share_of_rise_in_hidden_joints": hidden_share}
    on = per.loc[per["on_body"], "mpjpe"].mean()
    off = per.loc[~per["on_body"], "mpjpe"].mean()
    far = per.loc[~per["touches_body"], "mpjpe"].mean()
    ceiling = per.loc[per["on_body"], "ceiling"].mean() / per.loc[~per["on_body"], "ceiling"].mean()
    local_clean = float("nan")
    if mean_pose_joint_error is not None:
        rows = joints[joints["window"] >= 0]
        code = pd.MultiIndex.from_frame(per[["sample_index", "window"]])
        window_of_row = code.get_indexer(pd.MultiIndex.from_frame(rows[["sample_index", "window"]]))
        local_clean = clean_error_for_local_ratio(
            window_of_row, per["on_body"].to_numpy(), rows["occluded"].to_numpy(),
            mean_pose_joint_error[rows["sample_index"], rows["joint"]].astype(np.float64))
    rise_on, rise_off = per.loc[per["on_body"], "rise"].mean(), per.loc[~per["on_body"], "rise"].mean()
    return {"clean_mpjpe": float(clean.mean()), "windows": int(len(per)),
            "windows_on_body": int(per["on_body"].sum()), "windows_clear_of_body": int((~per["touches_body"]).sum()),
            "on_body_mpjpe": float(on), "off_body_mpjpe": float(off), "clear_of_body_mpjpe": float(far),
            "ratio_on_off": float(on / off), "ratio_on_clear": float(on / far),
            "on_body_rise": float(rise_on), "off_body_rise": float(rise_off),
            "ratio_rise_on_off": float(rise_on / rise_off) if rise_off > 0 else float("inf"),
            "hidden_joints": int(len(hidden)), "hidden_joint_mpjpe": float(hidden["mpjpe"].mean()),
            "hidden_joint_clean_mpjpe": float(hidden_clean.mean()),
            "ratio_hidden_vs_clean": float(hidden["mpjpe"].mean() / hidden_clean.mean()),
            "unhidden_joint_mpjpe": float(windows.loc[~windows["occluded"], "mpjpe"].mean()),
            "ratio_on_off_if_hidden_joints_lost": float(ceiling),
            "clean_error_for_1_5_if_failing_locally": local_clean, "by_region": by_region}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pare-demo")
    parser.add_argument("--checkpoint", default=None, help="Default: the bundled weights.")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="Architecture option the checkpoint was trained with (as for occbench train -o).")
    parser.add_argument("--limit", type=int, default=32, help="Demo samples (32 = all).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="Run directory (default: a temporary folder; the advocc40 run goes beside it).")
    parser.add_argument("--no-advocc", action="store_true", help="Skip the AdvOcc@40 comparison (item 4).")
    parser.add_argument("--dtd-root", default=None, help="DTD folder for the AdvOcc textures.")
    parser.add_argument("--json", dest="json_out", default=None, help="Also write the figures here.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from occbench.data import open_dataset
    from occbench.engine import run_protocol
    from occbench.keyvalue import parse_pairs
    from occbench.zoo import load_model

    model = load_model(args.model, checkpoint=args.checkpoint, device=args.device, **parse_pairs(args.option))
    dataset = open_dataset("demo")
    n = min(args.limit, len(dataset))
    if n < 2:
        parser.error("--limit must be at least 2: the mean-pose baseline is the mean GT pose of the samples")
    started = time.time()
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-demo-")) / "run"
    run_dir = run_protocol(model, dataset, "occsens40-dense", out_dir, seed=0, limit=n, progress=True)
    baselines = mean_pose_baselines(model, dataset, n)
    per_joint_const = baselines.pop("mean_gt_pose_joint_errors")
    figures = {"model": args.model, "checkpoint": model.provenance.get("checkpoint"),
               "trained_on": model.provenance.get("trained_on"), "dataset": "demo", "samples": n,
               **baselines,
               **sensitivity(Path(run_dir), int(model.input_size), part_labels(dataset, n), per_joint_const),
               "run_dir": str(run_dir)}
    if not args.no_advocc:
        adv_dir = run_protocol(model, dataset, "advocc40", out_dir.parent / "advocc40", seed=0, limit=n,
                               progress=True, dtd_root=args.dtd_root)
        figures.update(worst_window_vs_clean(Path(adv_dir)), advocc40_run_dir=str(adv_dir))
    figures["seconds"] = round(time.time() - started, 1)
    figures["clean_vs_mean_pose"] = figures["clean_mpjpe"] / figures["mean_gt_pose_mpjpe"]
    print(f"demo model {args.model} ({figures['trained_on']})")
    print(f"  clean MPJPE on {n} held-out demo samples: {figures['clean_mpjpe']:.1f} mm")
    print(f"  mean-pose predictor (mean GT pose of the demo set): {figures['mean_gt_pose_mpjpe']:.1f} mm "
          f"-> ratio {figures['clean_vs_mean_pose']:.2f} (target <= 0.5)")
    if "smpl_mean_params_mpjpe" in figures:
        print(f"  SMPL mean parameters (init_pose/init_shape): {figures['smpl_mean_params_mpjpe']:.1f} mm")
    print(f"  occsens40-dense: windows centred on the body {figures['on_body_mpjpe']:.1f} mm "
          f"({figures['windows_on_body']} windows), off the body {figures['off_body_mpjpe']:.1f} mm "
          f"-> ratio {figures['ratio_on_off']:.2f} (target >= 1.5)")
    print(f"  rise over the sample's clean error (the heatmap's contrast): on the body {figures['on_body_rise']:.1f} mm,"
          f" off it {figures['off_body_rise']:.1f} mm -> ratio {figures['ratio_rise_on_off']:.1f}")
    print(f"  windows not touching the body: {figures['clear_of_body_mpjpe']:.1f} mm "
          f"({figures['windows_clear_of_body']} windows) -> ratio {figures['ratio_on_clear']:.2f}")
    print(f"  joints hidden by a window: {figures['hidden_joint_mpjpe']:.1f} mm vs the same joints clean "
          f"{figures['hidden_joint_clean_mpjpe']:.1f} mm -> ratio {figures['ratio_hidden_vs_clean']:.2f} "
          f"({figures['hidden_joints']} joint-windows); joints left in view {figures['unhidden_joint_mpjpe']:.1f} mm")
    print(f"  if every hidden joint lost all information (mean-pose error) and nothing else changed: on / off "
          f"{figures['ratio_on_off_if_hidden_joints_lost']:.2f}; such a model reaches 1.5 only at a clean error of "
          f"{figures['clean_error_for_1_5_if_failing_locally']:.1f} mm or less (every joint)")
    print("  by the body region under the window's centre (rise = window error - the sample's clean error;"
          " hidden share = part of the rise in the joints the window hides):")
    for name, row in sorted(figures["by_region"].items(), key=lambda kv: -kv[1]["windows"]):
        print(f"    {name:<20} {row['windows']:>6} windows  {row['mpjpe']:6.1f} mm  rise {row['rise_over_clean']:5.1f} mm"
              f"  hidden joints {row['hidden_joints_per_window']:.2f}/window  hidden share"
              f" {row['share_of_rise_in_hidden_joints']:.2f}")
    if "advocc40_worst_vs_clean" in figures:
        published = ", ".join(f"{name} {occ / clean:.2f}" for name, (clean, occ) in PUBLISHED_ADVOCC40.items())
        print(f"  advocc40 worst window {figures['advocc40_worst_mpjpe']:.1f} mm vs clean "
              f"{figures['advocc40_clean_mpjpe']:.1f} mm -> {figures['advocc40_worst_vs_clean']:.2f}x "
              f"(official models on real 3DPW, 3DNBF Table 1: {published})")
    print(f"  {figures['seconds']} s; run directory {run_dir}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()

"""The protocol engine on a tiny conv model and a tiny in-memory dataset: run directory contents, visible-joint
masks, worst-window choice, GT-free mode, failed samples, replay, resume after kill -9, shard + merge."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from occbench.data.sample import Sample
from occbench.engine import run_protocol
from occbench.merge import merge_runs
from occbench.errors import UserError
from occbench.models.base import ZooModel

TESTS = Path(__file__).resolve().parent


class TinyModel(ZooModel):
    """A few conv layers regressing 6D rotations, betas and a camera; real SMPL-format (stand-in) body."""

    name = "tiny"

    def __init__(self, input_size: int = 224, seed: int = 0):
        super().__init__()
        self.input_size = input_size
        self.seen_sizes = set()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 157))

    def regress(self, images):
        from occbench.rotations import rot6d_to_rotmat
        self.seen_sizes.add(tuple(images.shape[-2:]))
        out = self.net(images)
        identity6d = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], device=images.device).repeat(24)
        rotmat = rot6d_to_rotmat((identity6d + 0.3 * out[:, :144]).reshape(-1, 6)).view(-1, 24, 3, 3)
        betas = 0.1 * out[:, 144:154]
        cam = torch.stack([0.9 + 0.1 * torch.tanh(out[:, 154]), 0.1 * out[:, 155], 0.1 * out[:, 156]], -1)
        return rotmat, betas, cam, {}


class TinyDataset:
    """n samples with random crops (a bright blob per joint) and random GT; ``broken`` indices raise."""

    name = "tiny"
    conventions = {"pelvis": "h36m-root", "joint_set": "lsp14"}
    provenance = {"generator": "tests/test_engine.py TinyDataset"}

    def __init__(self, n: int = 4, broken=(), delay: float = 0.0):
        rng = np.random.default_rng(123)
        self.crops = rng.integers(0, 255, (n, 224, 224, 3), dtype=np.uint8)
        self.joints3d = rng.normal(0, 0.3, (n, 14, 3)).astype(np.float32)
        self.joints2d = rng.uniform(20, 204, (n, 14, 2))
        self.joints2d[:, 13] = self.joints2d[:, 12] + [0.0, -30.0]       # head top above the neck
        self.broken, self.delay = set(broken), delay
        self.sample_ids = [f"tiny/{i:03d}" for i in range(n)]

    def __len__(self):
        return len(self.sample_ids)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        if i in self.broken:
            raise OSError(f"cannot read image tiny/{i:03d}.jpg")
        return Sample(sample_id=self.sample_ids[i], crop=self.crops[i], center=np.array([112.0, 112.0]),
                      scale=1.12, joints3d=self.joints3d[i], joints2d=self.joints2d[i],
                      joints2d_valid=np.ones(14, bool))


def tiny_model(input_size=224, seed=0):
    from occbench.body import load_body_model
    return TinyModel(input_size, seed).attach_body_model(load_body_model()).eval()


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def read(run_dir, table):
    return pd.read_parquet(Path(run_dir) / f"{table}.parquet")


def test_occsens_run_directory(model, tmp_path):
    run = run_protocol(model, TinyDataset(3), "occsens40", tmp_path / "run", batch_size=8,
                       memory_format="contiguous", quiet=True)
    config = json.loads((run / "run.json").read_text())
    assert config["protocol"]["stride"] == 40 and config["seed"] == 0 and config["status"] == "complete"
    assert config["conventions"]["pelvis"] == "h36m-root" and config["conventions"]["body_model_standin"]
    assert {"torch", "numpy"} <= set(config["versions"]) and config["device"]["type"] == "cpu"
    assert config["timing"]["windows"] == 3 * 36 and 0 < config["timing"]["forward_share"] <= 1
    joints = read(run, "joints")
    assert len(joints) == 3 * (36 + 1) * 14
    assert set(joints["window"]) == set(range(-1, 36))
    assert {"sample_id", "window", "joint", "mpjpe", "pa_mpjpe", "visible", "pckh", "x0", "y0", "size",
            "anchor_x", "anchor_y", "grid_row", "grid_col"} <= set(joints.columns)
    assert joints["visible"].all()                       # PARE evaluates every joint
    w7 = joints[(joints["window"] == 7)].iloc[0]
    assert (w7["grid_row"], w7["grid_col"], w7["x0"], w7["y0"], w7["anchor_x"]) == (1, 1, 40.0, 40.0, 40.0)
    samples = read(run, "samples")
    assert list(samples["n_windows"]) == [36, 36, 36]
    # per-sample worst window = argmax of the mean joint MPJPE
    per_window = joints[joints["window"] >= 0].groupby(["sample_id", "window"])["mpjpe"].mean()
    for _, s in samples.iterrows():
        assert s["worst_window"] == per_window[s["sample_id"]].idxmax()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_samples"] == 3 and metrics["headline"]["source"] == "occluded"
    expected = per_window.groupby(level=0).mean().mean()
    assert metrics["occluded"]["mpjpe"]["per-sample"] == pytest.approx(expected, rel=1e-4)


def test_clean_errors_match_direct_prediction(model, tmp_path):
    data = TinyDataset(2)
    run = run_protocol(model, data, "clean", tmp_path / "run", batch_size=2, memory_format="contiguous",
                       quiet=True)
    joints = read(run, "joints")
    assert set(joints["window"]) == {-1}
    crops = torch.from_numpy(data.crops).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        pred = model.predict(crops)
    aligned = pred.joints_lsp - pred.joints_h36m[:, :1]
    expected = (aligned - torch.from_numpy(data.joints3d)).norm(dim=-1).numpy() * 1000
    np.testing.assert_allclose(joints["mpjpe"].to_numpy().reshape(2, 14), expected, rtol=1e-4)


def test_advocc_visible_joints_and_worst_window(model, tmp_path):
    # advocc geometry with a coarse stride so the test stays fast (36 windows instead of 400)
    run = run_protocol(model, TinyDataset(2), "advocc40", tmp_path / "run", batch_size=16,
                       memory_format="contiguous", quiet=True, protocol_overrides={"stride": 40})
    config = json.loads((run / "run.json").read_text())
    assert config["textures"]["kind"] == "skimage" and config["comparable"] is False
    joints = read(run, "joints")
    occl = joints[joints["window"] >= 0]
    data = TinyDataset(2)
    # a joint is excluded exactly when strictly inside the patch (all tiny joints lie inside the crop)
    j2d = data.joints2d[occl["sample_id"].str[-1].astype(int).to_numpy(), occl["joint"].to_numpy()]
    x0, y0 = occl["x0"].to_numpy(), occl["y0"].to_numpy()
    inside = (j2d[:, 0] > x0) & (j2d[:, 0] < x0 + 40) & (j2d[:, 1] > y0) & (j2d[:, 1] < y0 + 40)
    np.testing.assert_array_equal(occl["visible"].to_numpy(), ~inside)
    assert inside.any()
    masked = occl["mpjpe"].where(occl["visible"])
    per_window = masked.groupby([occl["sample_id"], occl["window"]]).mean()
    samples = read(run, "samples")
    for _, s in samples.iterrows():
        assert s["worst_window"] == per_window[s["sample_id"]].idxmax()
        assert s["worst_texture"] != ""
    worst = occl.merge(samples[["sample_id", "worst_window"]], on="sample_id")
    worst = worst[(worst["window"] == worst["worst_window"]) & worst["visible"]]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["headline"]["source"] == "worst"
    assert metrics["headline"]["mpjpe"] == pytest.approx(worst["mpjpe"].mean(), rel=1e-4)   # pooled
    assert metrics["worst"]["n_joint_instances"] == len(worst)


def test_replay_evaluates_exactly_the_stored_worst_windows(model, tmp_path):
    overrides = {"stride": 40}
    source = run_protocol(model, TinyDataset(2), "advocc40", tmp_path / "a", batch_size=16,
                          memory_format="contiguous", quiet=True, protocol_overrides=overrides)
    other = tiny_model(seed=1)
    full = run_protocol(other, TinyDataset(2), "advocc40", tmp_path / "b", batch_size=16,
                        memory_format="contiguous", quiet=True, protocol_overrides=overrides)
    replay = run_protocol(other, TinyDataset(2), None, tmp_path / "c", replay=source, batch_size=16,
                          memory_format="contiguous", quiet=True)
    worst = read(source, "samples").set_index("sample_id")["worst_window"]
    replayed = read(replay, "joints")
    replayed = replayed[replayed["window"] >= 0]
    assert replayed.groupby("sample_id")["window"].unique().map(lambda w: list(w)).to_dict() == \
        {k: [v] for k, v in worst.items()}
    # the replayed window is the same occluder: model b's errors there equal its errors in its own full run
    b = read(full, "joints").set_index(["sample_id", "window", "joint"])
    r = replayed.set_index(["sample_id", "window", "joint"])
    np.testing.assert_allclose(r["mpjpe"], b.loc[r.index, "mpjpe"], rtol=1e-4)
    assert (r["tex_x"] == b.loc[r.index, "tex_x"]).all()


def test_gt_free_mode_and_failed_samples(model, tmp_path):
    run = run_protocol(model, TinyDataset(3, broken=[1]), "occsens40-dense-gtfree", tmp_path / "run",
                       batch_size=32, memory_format="contiguous", quiet=True,
                       protocol_overrides={"stride": 46})
    joints = read(run, "joints")
    assert np.allclose(joints.loc[joints["window"] == -1, "mpjpe"], 0.0, atol=1e-3)
    assert (joints.loc[joints["window"] >= 0, "mpjpe"] > 0).any()
    failed = read(run, "failed")
    assert list(failed["sample_id"]) == ["tiny/001"] and "cannot read image" in failed["reason"][0]
    assert sorted(read(run, "samples")["sample_id"]) == ["tiny/000", "tiny/002"]


def test_hkmr_each_joint_centres_occluder_on_joint(model, tmp_path):
    run = run_protocol(model, TinyDataset(1), "circle-doc2", tmp_path / "run", batch_size=14,
                       memory_format="contiguous", quiet=True)
    joints = read(run, "joints")
    rows = joints[(joints["window"] >= 0) & (joints["joint"] == joints["target_joint"])]
    assert len(rows) == 14 and rows["occluded"].all()
    np.testing.assert_allclose(rows["anchor_x"], TinyDataset(1).joints2d[0, :, 0])
    metrics = json.loads((run / "metrics.json").read_text())
    assert [(g["pattern"], g["doc"]) for g in metrics["by_pattern_doc"]] == [("circle", 2)]


def test_shard_merge_equals_single_run(model, tmp_path):
    kwargs = dict(batch_size=8, memory_format="contiguous", quiet=True, chunk_samples=1)
    single = run_protocol(model, TinyDataset(3), "occsens40", tmp_path / "single", **kwargs)
    shards = [run_protocol(model, TinyDataset(3), "occsens40", tmp_path / f"s{k}", shard=f"{k}/2", **kwargs)
              for k in range(2)]
    assert len(read(shards[0], "samples")) == 2 and len(read(shards[1], "samples")) == 1
    merged = merge_runs(shards, tmp_path / "merged")
    for table in ("joints", "samples", "failed"):
        pd.testing.assert_frame_equal(read(merged, table), read(single, table))
    assert json.loads((merged / "metrics.json").read_text()) == json.loads((single / "metrics.json").read_text())


def test_rerun_with_other_settings_is_refused(model, tmp_path):
    run_protocol(model, TinyDataset(1), "clean", tmp_path / "run", batch_size=2, memory_format="contiguous",
                 quiet=True)
    with pytest.raises(UserError, match="seed differs"):
        run_protocol(model, TinyDataset(1), "clean", tmp_path / "run", seed=5, batch_size=2,
                     memory_format="contiguous", quiet=True)


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_engine import TinyDataset, tiny_model
    from occbench.engine import run_protocol
    run_protocol(tiny_model(), TinyDataset(6, delay={delay}), "occsens40", sys.argv[1], batch_size=8,
                 memory_format="contiguous", chunk_samples=1, progress=False, quiet=True)
""")


def _run_script(tmp_path, out, delay):
    script = tmp_path / f"resume_{delay}.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(TESTS), delay=delay))
    return subprocess.Popen([sys.executable, str(script), str(out)], env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_resume_after_kill_is_identical(tmp_path):
    killed = tmp_path / "killed"
    proc = _run_script(tmp_path, killed, delay=0.4)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "chunks").glob("*.done"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in (killed / "chunks").glob("*.parquet")}
    assert 2 <= len(list((killed / "chunks").glob("*.done"))) < 6, "kill came too late to test resume"
    assert not (killed / "joints.parquet").exists()
    assert _run_script(tmp_path, killed, delay=0.0).wait() == 0
    # stored chunks were not recomputed
    for name, mtime in done_before.items():
        if (killed / "chunks" / name.replace(".joints.parquet", ".done")).exists() and "joints" in name:
            assert (killed / "chunks" / name).stat().st_mtime_ns == mtime
    straight = run_protocol(tiny_model(), TinyDataset(6), "occsens40", tmp_path / "straight", batch_size=8,
                            memory_format="contiguous", chunk_samples=1, quiet=True)
    for table in ("joints", "samples", "failed"):
        pd.testing.assert_frame_equal(read(killed, table), read(straight, table))
    assert json.loads((killed / "run.json").read_text())["resumed"] == 1


def test_voc_objects_end_to_end(model, tmp_path):
    from helpers import fake_voc
    fake_voc(tmp_path / "voc")
    run = run_protocol(model, TinyDataset(2), "voc-objects", tmp_path / "run", voc_root=tmp_path / "voc",
                       batch_size=4, memory_format="contiguous", quiet=True, protocol_overrides={"copies": 3})
    joints = read(run, "joints")
    assert sorted(set(joints["window"])) == [-1, 0, 1, 2]
    clean = joints[joints["window"] == -1]["mpjpe"].to_numpy()
    occluded = joints[joints["window"] == 0]["mpjpe"].to_numpy()
    assert not np.allclose(clean, occluded)


def test_benchmark_one_call_records_how_it_ran(model, tmp_path):
    import occbench
    run = occbench.benchmark(model=model, protocol="occsens40", dataset=TinyDataset(1), out_dir=tmp_path / "r",
                             max_windows=5, quiet=True)
    config = json.loads((run / "run.json").read_text())
    # nothing timed: the CPU default batch (32) capped at the windows one chunk holds, the default format
    assert config["batch_size"] == 5 and config["memory_format"] == "channels_last"
    assert config["threads"] == torch.get_num_threads() and config["execution"]["batch_rule"] == "default"
    assert config["autotune"] is None
    assert sorted(set(read(run, "joints")["window"])) == [-1, 0, 1, 2, 3, 4]


def test_model_at_320_gets_occluders_drawn_at_320(tmp_path):
    model = tiny_model(input_size=320)
    run = run_protocol(model, TinyDataset(1), "advocc40", tmp_path / "run", batch_size=16,
                       memory_format="contiguous", quiet=True, protocol_overrides={"stride": 40})
    assert model.seen_sizes == {(320, 320)}
    joints = read(run, "joints")
    w1 = joints[joints["window"] == 1].iloc[0]
    assert w1["occ_hw"] * 2 == 57 and w1["occ_cx"] == 57 + 28.5          # stride 40 -> 57 px at 320
    assert w1["x0"] == pytest.approx(57 * 224 / 320) and w1["size"] == pytest.approx(57 * 224 / 320)
    assert json.loads((run / "run.json").read_text())["model"]["input_size"] == 320


def test_a_320_px_model_sees_a_320_px_crop_of_the_source_image(tmp_path):
    """3DNBF's pipeline crops 320 px from the image: the engine must not upsample the 224 px crop."""
    from occbench.data import open_dataset
    from occbench.body import load_body_model
    from occbench.data.crop import crop_image
    dataset = open_dataset("demo", limit=2)
    model = TinyModel(input_size=320).attach_body_model(load_body_model()).eval()
    seen = []
    original = model.regress

    def regress(images):
        seen.append(images.clone())
        return original(images)

    model.regress = regress
    run_dir = run_protocol(model, dataset, "clean", tmp_path / "run", batch_size=2, memory_format="contiguous",
                           progress=False, quiet=True)
    config = json.loads((run_dir / "run.json").read_text())
    assert config["conventions"]["crop_resolution"].startswith("320 px cut from the source image")
    mean = torch.tensor(model.normalization[0]).view(1, 3, 1, 1)
    std = torch.tensor(model.normalization[1]).view(1, 3, 1, 1)
    got = seen[-1] * std + mean                          # back to RGB [0,1]
    for i in range(2):
        r = dataset.records
        direct = crop_image(dataset.load_image(i), r.center[i], float(r.scale[i]), 320)
        expected = torch.from_numpy(direct).permute(2, 0, 1).float() / 255.0
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=0)
        resized = F.interpolate(torch.from_numpy(dataset[i].crop).permute(2, 0, 1)[None].float() / 255.0,
                                size=(320, 320), mode="bilinear", align_corners=False)[0]
        assert (got[i] - resized).abs().max() > 0.05       # not the 224 crop upsampled


def test_occbench_trained_models_keep_the_crops_they_learned_on(tmp_path):
    """A model trained by `occbench train` (pare-demo) learned on 224 px crops resampled to its input size."""
    import occbench
    model = occbench.load_model("pare-demo", device="cpu")
    assert model.crop_from == "canonical"
    run_dir = run_protocol(model, occbench.open_dataset("demo", limit=1), "clean", tmp_path / "run", batch_size=1,
                           memory_format="contiguous", progress=False, quiet=True)
    crop = json.loads((run_dir / "run.json").read_text())["conventions"]["crop_resolution"]
    assert crop.startswith("224 px crop resized to 96 px") and "trained by occbench" in crop

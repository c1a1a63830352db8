"""occbench train: steps run on CPU, the loss goes down, resume continues the run exactly, the checkpoint
loads strictly through load_model with the sidecar's trained_on, the CLI reports bad input."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from occbench.camera import fit_weak_camera
from occbench.train import TRAINED_ON_SYNTHETIC, TrainConfig, add_occluders, learning_rate, train

TINY = {"input_size": 32}          # pare-demo at 32 px: 2x2 trunk features, 8x8 part maps


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from occbench.data.synthetic import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp("train_synth"), n=4, seed=11, image_size=96)


@pytest.fixture(scope="module")
def dataset(synth):
    from occbench.data import open_dataset
    return open_dataset(str(synth))


def _cfg(tmp_path, name, **kw):
    base = dict(model="pare-demo", dataset="unused", out=str(tmp_path / name), steps=4, batch_size=2,
                lr=1e-3, seed=3, options=dict(TINY), num_threads=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases_without_augmentation(tmp_path, dataset):
    cfg = _cfg(tmp_path, "dec.pt", steps=14, limit=2, augment=False)
    result = train(cfg, progress=False, dataset=dataset)
    totals = [h["total"] for h in result.history]
    assert len(totals) == 14
    assert np.mean(totals[-3:]) < 0.8 * np.mean(totals[:3]), totals
    # every PARE Eq. 2 term is present, the part-attention term included (the set has part labels)
    assert {"3d", "2d", "pose", "betas", "part", "total"} <= set(result.history[0])


def test_resume_continues_and_matches_uninterrupted(tmp_path, dataset):
    full = train(_cfg(tmp_path, "full.pt"), progress=False, dataset=dataset)
    cfg = _cfg(tmp_path, "cut.pt")
    part = train(cfg, progress=False, dataset=dataset, stop_after=2)
    assert part.steps == 2 and not (tmp_path / "cut.pt").exists()
    assert (tmp_path / "cut.pt.state").is_file()
    resumed = train(cfg, progress=False, dataset=dataset, resume=True)
    assert resumed.steps == 4
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["total"] for h in resumed.history] == [h["total"] for h in full.history]
    a = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resume with other settings is refused, naming the difference
    from occbench.errors import UserError
    with pytest.raises(UserError, match="lr"):
        train(_cfg(tmp_path, "cut.pt", steps=6, lr=5e-4), progress=False, dataset=dataset, resume=True)


def test_cosine_schedule_known_values():
    cfg = TrainConfig(model="pare-demo", dataset="-", out="-", steps=1000, lr=1e-3, lr_schedule="cosine")
    # 20 warm-up steps (2 %), peak at the end of the warm-up, half-way through the decay ~ 0.505 lr, 1 % at the end
    assert learning_rate(cfg, 0) == pytest.approx(1e-3 / 20)
    assert learning_rate(cfg, 19) == pytest.approx(1e-3)
    assert learning_rate(cfg, 20) == pytest.approx(1e-3)
    assert learning_rate(cfg, 510) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert learning_rate(cfg, 1000) == pytest.approx(1e-5)
    assert learning_rate(TrainConfig(model="m", dataset="-", out="-", lr=3e-4), 123) == 3e-4


def test_cosine_resume_matches_and_needs_the_same_total(tmp_path, dataset):
    full = train(_cfg(tmp_path, "cf.pt", lr_schedule="cosine"), progress=False, dataset=dataset)
    cfg = _cfg(tmp_path, "cc.pt", lr_schedule="cosine")
    train(cfg, progress=False, dataset=dataset, stop_after=3)
    from occbench.errors import UserError
    with pytest.raises(UserError, match="steps"):      # another total would change the decay already applied
        train(_cfg(tmp_path, "cc.pt", lr_schedule="cosine", steps=8), progress=False, dataset=dataset, resume=True)
    resumed = train(cfg, progress=False, dataset=dataset, resume=True)
    assert [h["total"] for h in resumed.history] == [h["total"] for h in full.history]
    assert json.loads(resumed.sidecar.read_text())["lr_schedule"] == "cosine"


def test_checkpoint_loads_strictly_with_trained_on(tmp_path, dataset):
    from occbench.zoo import load_model
    result = train(_cfg(tmp_path, "m.pt", steps=2, half=True), progress=False, dataset=dataset)
    side = json.loads(result.sidecar.read_text())
    assert side["trained_on"] == TRAINED_ON_SYNTHETIC
    assert side["steps"] == 2 and side["seed"] == 3 and side["batch_size"] == 2
    assert side["options"]["input_size"] == 32 and side["options"]["backbone"] == "resnet18"
    assert side["dataset"]["n_samples"] == 4 and side["dataset"]["part_labels"]
    assert side["stored_dtype"] == "float16"
    model = load_model("pare-demo", checkpoint=result.checkpoint, device="cpu", **TINY)
    assert model.provenance["trained_on"] == TRAINED_ON_SYNTHETIC
    assert model.provenance["training"]["steps"] == 2
    assert next(model.parameters()).dtype == torch.float32
    stored = torch.load(result.checkpoint, weights_only=True)["model"]
    key = "head.pose_mlp.weight"
    assert torch.equal(model.state_dict()[key], stored[key].float())
    pred = model.predict(torch.rand(1, 3, 224, 224))
    assert torch.isfinite(pred.joints_lsp).all()
    # fine-tuning from it starts from those weights and records how they were trained
    tuned = train(_cfg(tmp_path, "ft.pt", steps=1, lr=0.0 + 1e-12, init_checkpoint=str(result.checkpoint)),
                  progress=False, dataset=dataset)
    side2 = json.loads(tuned.sidecar.read_text())
    assert side2["total_steps"] == 3 and side2["init_training"]["steps"] == 2
    start = torch.load(tuned.checkpoint, weights_only=True)["model"]["head.pose_mlp.weight"]
    assert torch.allclose(start.float(), stored[key].float(), atol=1e-6)


def test_weak_camera_fit_recovers_known_values():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(14, 3))
    uv = 300.0 * pts[:, :2] + np.array([110.0, 95.0])
    valid = np.ones(14, bool)
    valid[3] = False
    uv[3] = 1e6                                   # an invalid joint does not disturb the fit
    a, b = fit_weak_camera(pts, uv, valid)
    assert a == pytest.approx(300.0) and b == pytest.approx([110.0, 95.0])


def test_occluders_hide_part_labels():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    parts = torch.ones(6, 32, 32)
    out, labels = add_occluders(images, parts, prob=1.0, gen=gen)
    changed = (out != images).any(1)
    assert changed.any(dim=(1, 2)).all()                  # prob 1: every sample is occluded
    assert torch.equal(labels == 0, changed)              # exactly the occluded pixels lose their part label
    none, _ = add_occluders(images, parts, prob=0.0, gen=gen)
    assert torch.equal(none, images)


def test_cli_help_and_bad_dataset(tmp_path, capsys):
    from occbench.cli import main
    try:
        main(["train", "--help"])
    except SystemExit as exc:          # click may or may not exit after printing help
        assert exc.code in (0, None)
    text = capsys.readouterr().out
    assert "--resume" in text and "--steps" in text and "--model" in text
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "pare-demo", "--dataset", str(missing), "--steps", "1",
              "--out", str(tmp_path / "x.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere.npz" in err and not (tmp_path / "x.pt").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "no-such-model", "--dataset", "demo", "--steps", "1",
              "--out", str(tmp_path / "x.pt")])
    assert exit_info.value.code == 2


def test_bundled_demo_weights_load_by_default(tmp_path, monkeypatch):
    from occbench.zoo import load_model
    monkeypatch.setenv("OCCBENCH_CHECKPOINT_DIR", str(tmp_path))       # nothing there: the bundled file is used
    model = load_model("pare-demo", device="cpu")
    assert model.provenance["checkpoint"].endswith("assets/pare_demo.pt")
    assert model.provenance["trained_on"] == TRAINED_ON_SYNTHETIC
    assert model.input_size == 96 and next(model.parameters()).dtype == torch.float32


def test_bundled_demo_weights_beat_the_mean_pose(single_thread):
    """The shipped weights learned: on the held-out demo set their clean MPJPE is under half that of the best
    constant predictor (the demo set's own mean pose). bench/bench_demo_model.py prints the full figures."""
    from occbench.data import open_dataset
    from occbench.metrics import mpjpe
    from occbench.zoo import load_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model("pare-demo", device="cpu")
        ds = open_dataset("demo")
    samples = [ds[i] for i in range(len(ds))]
    crops = torch.as_tensor(np.stack([s.crop for s in samples])).permute(0, 3, 1, 2).float() / 255
    gt = torch.as_tensor(np.stack([s.joints3d for s in samples])).float()
    with torch.no_grad():
        pred = model.predict(crops)
    pred3d = pred.joints_lsp - pred.joints_h36m[:, :1]            # the demo set's pelvis: H36M root
    ours = float(mpjpe(pred3d, gt).mean())
    constant = float(mpjpe(gt.mean(0, keepdim=True).expand_as(gt), gt).mean())
    assert ours < 0.5 * constant, (ours, constant)

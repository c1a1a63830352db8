"""Incremental inference: per-window outputs equal the full forward for every supported zoo ResNet model."""
import numpy as np
import pytest
import torch

from occbench import occluders as occ
from occbench import windows as win
from occbench.models import incremental
from occbench.models.incremental import IncrementalRunner, supports_incremental, unused_warning
from occbench.protocol import load_protocol
from occbench.zoo import load_model

ROT_TOL = 1e-4      # rotation matrix entries
VERT_TOL_MM = 1e-3  # vertices, millimetres

MODELS = {  # name -> (load options, grid windows besides the 6 border/size edge cases, pose layer std)
    "pare-demo": ({}, 6, 0.05),
    "pare-r50": ({"name": "pare", "backbone": "resnet50"}, 2, 0.01),
    "spin": ({}, 2, 0.01),
    "3dnbf-reg": ({"input_size": 64}, 3, 0.01),
}
IDENTITY_6D = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])


def well_scaled(model, size, pose_std, seed=0):
    """Random weights conditioned like a trained regressor, whose outputs react to a window by far more than
    fp32 rounding: BatchNorm statistics calibrated on random images (a seeded untrained net otherwise blows up
    or stays constant), a larger head so the outputs depend on the image, and 6D rotations regressed around
    a rest pose (Gram-Schmidt on tiny random 6D vectors would amplify rounding by orders of magnitude)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and m.weight.std() < 0.01:
            torch.nn.init.kaiming_normal_(m.weight)
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight, gain=0.1)
        if isinstance(m, torch.nn.BatchNorm2d):   # random affine parameters: no reliance on unit scales
            m.reset_running_stats()
            m.momentum = None
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    for name, p in model.named_parameters():
        if name.endswith("keypoint_final_layer.weight"):
            torch.nn.init.normal_(p, std=0.01)
        if name.endswith("pose_mlp.weight"):
            torch.nn.init.normal_(p, std=pose_std)
            if not hasattr(model.head, "use_mean_pose"):  # 3DNBF: no mean-pose switch; pooled ReLU features
                with torch.no_grad():                     # (mean ~0.4 per channel) x this give ~identity 6D
                    p += IDENTITY_6D.view(1, 6, 1, 1, 1, 1) / (0.4 * p.shape[2])
    if hasattr(getattr(model, "head", None), "use_mean_pose"):  # PARE: regress around the mean pose, as SPIN's IEF does
        model.head.use_mean_pose = model.head.use_mean_camshape = True
    model.train()
    with torch.no_grad():
        model.regress(model.preprocess(torch.rand(4, 3, size, size)))
    model.eval()
    return model


def window_table(size, count):
    """Boxes crossing each image border, a 3x larger box, a 1-pixel box and an untouched (clean) row (sizes
    vary within one batch), then ``count`` occsens40-dense windows: the corners first, then the middle."""
    table = load_protocol("occsens40-dense").windows("s", size, 0)
    n, side = len(table["window"]), win.grid_count(size, win.scale_px(40, size), win.scale_px(8, size))
    picks = [0, n - 1, side - 1, n - side, n // 2 + 3, side * (side // 2)][:count]
    rows = {k: np.concatenate([v[picks], v[:6]]) for k, v in table.items()}
    half = rows["occ_hw"][0]
    edits = [(-half / 2, size / 3, half), (size + half / 2 - 1, size / 2, half), (size / 2, -half / 2 + 0.5, half),
             (size / 3, size - 2.0, 3 * half), (size / 2 + 0.5, size / 2 + 0.5, 0.5), (size / 2, size / 2, 0.0)]
    for i, (cx, cy, hw) in enumerate(edits):
        j = len(picks) + i
        rows["occ_cx"][j], rows["occ_cy"][j], rows["occ_hw"][j], rows["occ_hh"][j] = cx, cy, hw, hw
    order = np.r_[len(picks):len(picks) + 6, 0:len(picks)]
    return {k: v[order] for k, v in rows.items()}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, single_thread):
    options, count, pose_std = MODELS[request.param]
    options = dict(options)
    name = options.pop("name", request.param)
    model = load_model(name, weights="random", device="cpu", **options)
    size = model.input_size
    model = well_scaled(model, size, pose_std)
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 3, size, size, generator=gen)
    rows = window_table(size, count)
    samples = np.arange(len(rows["window"])) % 2          # one batch holds windows of both samples
    images = occ.compose(clean[samples], rows, None)
    return request.param, model, clean, samples, images


def test_windows_equal_the_full_forward(case):
    name, model, clean, samples, images = case
    runner = IncrementalRunner(model)
    with torch.inference_mode():
        cache = runner.cache(clean)
        full = model.regress(model.preprocess(images))
        fast = runner.regress(cache, samples, images)
        untouched = [out[torch.as_tensor(samples)] for out in model.regress(model.preprocess(clean))[:3]]
        full_pred = model.prediction_from_params(*full[:3])
        fast_pred = model.prediction_from_params(*fast[:3])
    effect = (full[0] - untouched[0]).abs().amax(dim=(1, 2, 3))
    assert effect.max() > 100 * ROT_TOL, f"{name}: windows barely change the output; the test would be void"
    assert (fast[0] - full[0]).abs().max() < ROT_TOL
    assert (fast_pred.vertices - full_pred.vertices).abs().max() * 1000 < VERT_TOL_MM
    for a, b in zip(fast[1:3], full[1:3]):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["pare-demo"])
def test_exact_in_float64(name, single_thread):
    """The differences are rounding only: in float64 they all but vanish."""
    options, _, pose_std = MODELS[name]
    model = load_model(name, weights="random", device="cpu", **options)
    model = well_scaled(model, model.input_size, pose_std).double()
    size = model.input_size
    clean = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = window_table(size, 2)
    samples = np.arange(len(rows["window"])) % 2
    images = occ.compose(clean[samples], rows, None)
    runner = IncrementalRunner(model)
    with torch.inference_mode():
        fast = runner.regress(runner.cache(clean), samples, images)
        full = model.regress(model.preprocess(images))
        assert (fast[0] - full[0]).abs().max() < 1e-10
        vertices = [model.prediction_from_params(*out[:3]).vertices for out in (fast, full)]
    assert (vertices[0] - vertices[1]).abs().max() * 1000 < 1e-6


def test_box_kept_in_small_batches_and_never_switching_to_full(case):
    """One window per call (the batch's common box is the row's own), and a trunk run incrementally to the end."""
    name, model, clean, samples, images = case
    runner = IncrementalRunner(model, full_fraction=1.1)
    with torch.inference_mode():
        cache = runner.cache(clean)
        for b in (0, 3, len(samples) - 1):
            fast = runner.regress(cache, samples[b:b + 1], images[b:b + 1])
            full = model.regress(model.preprocess(images[b:b + 1]))
            assert (fast[0] - full[0]).abs().max() < ROT_TOL, f"{name}: window row {b}"


def test_flops_inside_changed_regions(case):
    """A mid-image window recomputes conv1 on the output box its pixels reach, and nothing when unchanged."""
    name, model, clean, samples, images = case
    size = model.input_size
    runner = IncrementalRunner(model, full_fraction=1.1)
    runner.macs = {}
    conv1 = "backbone.conv1" if hasattr(model, "backbone") else "conv1"
    row = len(samples) - 1                                   # the last grid window: away from the corners
    with torch.inference_mode():
        cache = runner.cache(clean)
        runner.regress(cache, samples[row:row + 1], images[row:row + 1])
        changed = (model.preprocess(images[row:row + 1]) != model.preprocess(clean[samples[row:row + 1]]))
        ys, xs = torch.nonzero(changed.any(1)[0], as_tuple=True)
        boxes = []
        for low, high in ((ys.min().item(), ys.max().item()), (xs.min().item(), xs.max().item())):
            # 7x7 conv, stride 2, padding 3: outputs o with 2o - 3 <= high and 2o + 3 >= low
            boxes.append(min(size // 2 - 1, (high + 3) // 2) - max(0, -((3 - low) // 2)) + 1)
        assert runner.macs[conv1] == boxes[0] * boxes[1] * 64 * 3 * 49
        assert runner.macs[conv1] < 0.2 * (size // 2) ** 2 * 64 * 3 * 49
        runner.macs = {}
        runner.regress(cache, samples[:1], clean[samples[:1]])
    assert runner.macs[conv1] == 2 * 2 * 64 * 3 * 49   # a 1-pixel box at the corner reaches 2x2 outputs


def test_support_and_measured_gain(monkeypatch):
    hrnet = load_model("pare", weights="random", device="cpu")
    support = supports_incremental(hrnet)
    assert not support.supported and "hrnet" in support.reason
    demo = load_model("pare-demo", weights="random", device="cpu").eval()
    support = supports_incremental(demo)
    assert support.config == "pare/resnet18/3/96/2x128" and support.use
    assert not supports_incremental(demo, precision="bf16").use
    monkeypatch.setitem(incremental.MEASURED_GAIN, "pare/resnet18/3/96/2x128", 1.05)
    support = supports_incremental(demo)
    assert support.supported and not support.use and "1.05" in support.reason
    assert "does nothing for pare/resnet18/3/96/2x128" in unused_warning(support)
    assert not supports_incremental(demo.train()).supported
    with pytest.raises(ValueError, match="eval mode"):
        IncrementalRunner(demo)


def test_engine_run_with_incremental_equals_the_normal_run(tmp_path, single_thread, capsys):
    import json

    import pandas as pd

    from occbench.engine import run_protocol
    from test_engine import TinyDataset, tiny_model

    options, _, pose_std = MODELS["pare-demo"]
    model = well_scaled(load_model("pare-demo", weights="random", device="cpu", **options), 96, pose_std)
    kwargs = dict(batch_size=8, memory_format="contiguous", progress=False, quiet=True, max_windows=12)
    runs = {flag: run_protocol(model, TinyDataset(2), "occsens40", tmp_path / str(flag), incremental=flag,
                               **kwargs) for flag in (False, True)}
    normal, fast = (pd.read_parquet(runs[flag] / "joints.parquet") for flag in (False, True))
    assert len(normal) == len(fast) == 14 * 2 * 13                # 2 samples x (clean + 12 windows)
    assert (normal["window"].to_numpy() == fast["window"].to_numpy()).all()
    assert np.abs(normal["mpjpe"].to_numpy() - fast["mpjpe"].to_numpy()).max() < VERT_TOL_MM
    assert normal["mpjpe"].std() > 1.0                         # the windows do move the joints
    record = json.loads((runs[True] / "run.json").read_text())["incremental"]
    assert record["used"] and record["config"] == "pare/resnet18/3/96/2x128"
    assert json.loads((runs[False] / "run.json").read_text())["incremental"] is None

    # a model it cannot run: a warning, recorded, and the very same numbers as without the flag
    tiny = tiny_model()
    plain = run_protocol(tiny, TinyDataset(1), "occsens40", tmp_path / "tiny", **kwargs)
    asked = run_protocol(tiny, TinyDataset(1), "occsens40", tmp_path / "tiny-inc", incremental=True, **kwargs)
    assert "--incremental does nothing" in capsys.readouterr().err
    assert json.loads((asked / "run.json").read_text())["incremental"]["used"] is False
    pd.testing.assert_frame_equal(pd.read_parquet(plain / "joints.parquet"), pd.read_parquet(asked / "joints.parquet"))


def test_workers_run_incrementally_too(tmp_path, single_thread):
    """A worker rebuilds the runner with incremental inference: its tables equal the serial incremental run's
    bit for bit, and differ from a normal run's (by fp32 rounding only)."""
    import pandas as pd

    from occbench.engine import run_protocol
    from occbench.parallel import ScaleOut
    from test_engine import TinyDataset

    model = load_model("pare-demo", device="cpu")    # the bundled weights; rebuilt by name on the worker
    kwargs = dict(batch_size=8, memory_format="contiguous", progress=False, quiet=True, max_windows=6)
    runs = {name: run_protocol(model, TinyDataset(2), "occsens40", tmp_path / name, **kwargs, **extra)
            for name, extra in {"normal": {}, "serial": {"incremental": True},
                                "worker": {"incremental": True, "scale": ScaleOut(workers=1, threads=1)}}.items()}
    mpjpe = {name: pd.read_parquet(path / "joints.parquet")["mpjpe"].to_numpy() for name, path in runs.items()}
    assert (mpjpe["worker"] == mpjpe["serial"]).all()
    assert (mpjpe["worker"] != mpjpe["normal"]).any()
    assert np.abs(mpjpe["worker"] - mpjpe["normal"]).max() < VERT_TOL_MM

"""The catalogue of bad inputs (issue 14): each is a one-line error naming the option/field, the value and
the valid range, exit status 2 and nothing written; bad images are failed samples with their reason; no
file occbench reads runs pickled code (each payload would write a marker file)."""
import os
import pickle
import struct
import types
import warnings
import zlib

import cv2
import numpy as np
import pytest
import torch

from occbench.cli import main
from occbench.data import BadSample, open_dataset
from occbench.errors import UserError
from occbench.standin import standin_dir


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # default run folders (runs/...) land in tmp_path; the body model is the stand-in everywhere
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OCCBENCH_SMPL_DIR", str(standin_dir()))
    monkeypatch.setenv("OCCBENCH_DATA_DIR", str(standin_dir()))
    warnings.simplefilter("ignore")


def run_cli(args, capsys):
    """(exit status, stderr) of ``occbench ARGS`` run in-process."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def assert_refused(args, capsys, tmp_path, *needles):
    code, err = run_cli(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
    return lines[0]


RUN = ["run", "-m", "pare-demo", "-p", "occsens40", "--out", "out", "--no-progress"]


# ------------------------------------------------------------------------------------------ run options
@pytest.mark.parametrize("extra, needles", [
    (["--limit", "0"], ["--limit 0", ">= 1"]),
    (["--limit", "-3"], ["--limit -3", ">= 1"]),
    (["--max-windows", "-1"], ["--max-windows -1", ">= 0"]),
    (["--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    (["--batch-size", "-8"], ["--batch-size -8", ">= 1"]),
    (["--seed", "-1"], ["--seed -1", "0..4294967295"]),
    (["--seed", str(2**32)], [f"--seed {2**32}", "0..4294967295"]),
    (["--device", "foo"], ["--device 'foo'", "cpu, cuda"]),
    (["--device", "cuda:64"], ["--device 'cuda:64'"]),
    (["--model-option", "bogus=1"], ["bogus", "'pare-demo'", "valid options: backbone"]),
    (["--weights", "random", "--checkpoint", "some.ckpt"], ["--weights random", "--checkpoint some.ckpt"]),
    (["--replay", "runs/old", "--seed", "3"], ["--seed 3", "--replay"]),
])
def test_run_options_are_checked(extra, needles, capsys, tmp_path):
    assert_refused(RUN + extra, capsys, tmp_path, *needles)


def test_device_cuda_without_gpu(capsys, tmp_path):
    if torch.cuda.is_available():
        assert_refused(RUN + ["--device", f"cuda:{torch.cuda.device_count()}"], capsys, tmp_path, "GPU(s)")
    else:
        assert_refused(RUN + ["--device", "cuda"], capsys, tmp_path, "--device 'cuda'", "no CUDA GPU")


@pytest.mark.parametrize("extra, needles", [
    (["--seed", "-1"], ["--seed -1", "0..4294967295"]),
    (["--limit", "0"], ["--limit 0", ">= 1"]),
    (["--device", "foo"], ["--device 'foo'", "cpu, cuda"]),
])
def test_train_options_are_checked(extra, needles, capsys, tmp_path):
    args = ["train", "-m", "pare-demo", "-d", "demo", "--steps", "1", "--out", "out/ck.pt", "--no-progress"]
    assert_refused(args + extra, capsys, tmp_path, *needles)


# ------------------------------------------------------------------------------------------ protocol fields
@pytest.mark.parametrize("protocol, override, needles", [
    ("occsens40", "pckh_threshold=nan", ["'pckh_threshold'", "nan", "finite"]),
    ("occsens40", "pckh_threshold=inf", ["'pckh_threshold'", "inf", "finite"]),
    ("occsens40", "fill_color=[0.5, nan, 0.5]", ["'fill_color'", "nan", "finite"]),
    ("bar-doc1", "bar_angle=[0.0, nan]", ["'bar_angle'", "nan", "finite"]),
    ("bar-doc1", "rect_aspect=[0.5, inf]", ["'rect_aspect'", "inf", "finite"]),
    ("bar-doc1", "jitter=nan", ["'jitter'", "nan", "finite"]),
    ("bar-doc1", "bar_length=nan", ["'bar_length'", "nan", "finite"]),
    ("bar-doc1", "jitter=1e6", ["'jitter'", "1000000.0", "[0, 224]"]),
    ("bar-table1", "copies=1000000", ["'copies'", "1000000", "1..10000"]),
    ("voc-objects", "max_objects=1000", ["'max_objects'", "1000", "1..50"]),
    ("occsens40", "stride=1", ["'stride' = 1", "0 px", "96 px", "stride >= 2"]),
    ("occsens40", "size=1", ["'size' = 1", "0 px", "size >= 2"]),
    ("occsens40", "stride=0", ["'stride' = 0", "1..224"]),
    ("occsens40", "name=../../escaped", ["'name'", "../../escaped", "letters, digits"]),
    ("occsens40", "name=.hidden", ["'name'", ".hidden"]),
    ("bar-doc1", "docs=[" + ", ".join(["1"] * 10000) + "]", ["'docs'", "(10000 items)", "140000 windows", "100000"]),
])
def test_protocol_fields_are_checked(protocol, override, needles, capsys, tmp_path):
    args = ["run", "-m", "pare-demo", "-p", protocol, "--set", override, "--no-progress"]
    assert_refused(args, capsys, tmp_path, *needles)
    assert not (tmp_path.parent / "escaped").exists()


def test_protocol_checks_protect_the_python_api(tmp_path):
    from occbench.engine import run_protocol
    from occbench.protocol import load_protocol
    with pytest.raises(UserError, match="'pckh_threshold' = nan"):
        load_protocol("occsens40", pckh_threshold=float("nan"))
    with pytest.raises(UserError, match="'name' = 'a/../../b'"):
        load_protocol("occsens40", name="a/../../b")
    model = types.SimpleNamespace(input_size=96)   # refused before the model is used
    with pytest.raises(UserError, match="'stride' = 1 rounds to 0 px .* 96 px"):
        run_protocol(model, [], "occsens40", tmp_path / "out", protocol_overrides={"stride": 1})
    for kwargs, needle in (({"limit": 0}, "--limit 0"), ({"max_windows": -2}, "--max-windows -2"),
                           ({"batch_size": 0}, "--batch-size 0"), ({"seed": -5}, "--seed -5"),
                           ({"seed": 1, "replay": "x"}, "--seed 1 with --replay")):
        with pytest.raises(UserError, match=needle):
            run_protocol(model, [], "occsens40", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    # the default run folder never leaves runs/, whatever the dataset is called
    from occbench.checks import safe_folder_name
    assert safe_folder_name("m-p-../../x-s0") == "m-p-.._.._x-s0"
    assert safe_folder_name("../up") == "_up" and "/" not in safe_folder_name("a/b\\c")


def test_model_options_are_checked_by_load_model():
    from occbench.zoo import load_model
    with pytest.raises(UserError, match="model 'pare-demo' has no option 'bogus'"):
        load_model("pare-demo", weights="random", device="cpu", bogus=1)
    with pytest.raises(UserError, match="model 'hkmr' has no option 'bogus'"):   # builder takes **options
        load_model("hkmr", weights="random", device="cpu", bogus=1)
    with pytest.raises(UserError, match="--weights random with --checkpoint"):
        load_model("pare-demo", weights="random", checkpoint="x.ckpt", device="cpu")
    with pytest.raises(UserError, match="--device 'tpu'"):
        load_model("pare-demo", weights="random", device="tpu")
    with pytest.raises(UserError, match="--seed -1"):
        load_model("pare-demo", weights="random", device="cpu", seed=-1)


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_with_nan_is_refused(capsys, tmp_path):
    from occbench.models import build_model
    state = build_model("pare-demo").state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    code, _ = run_cli(["check-checkpoint", "--model", "pare-demo", str(bad), "--allow-partial"], capsys)
    assert code == 1   # NaN weights are refused even where a partial file would be accepted
    line = assert_refused(RUN + ["-p", "clean", "--checkpoint", str(bad)], capsys, tmp_path, key, "NaN or inf")
    assert "1 tensor(s) holding NaN or inf" in line


def test_check_checkpoint_names_the_nan_keys(capsys, tmp_path):
    from occbench.models import build_model
    state = build_model("pare-demo").state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key] = torch.full_like(state[key], float("inf"))
    torch.save(state, tmp_path / "inf.pt")
    code, _ = run_cli(["check-checkpoint", "--model", "pare-demo", str(tmp_path / "inf.pt")], capsys)
    assert code == 1
    # the report lists the key under its own heading
    from occbench.checkpoints import check_checkpoint
    report = check_checkpoint(build_model("pare-demo"), tmp_path / "inf.pt")
    assert report.nonfinite == [key] and not report.ok and "NaN or inf values (1):" in report.describe()


# ------------------------------------------------------------------------------------------ images
W, H = 320, 240


def _png_header_only(path, width, height):
    """A tiny PNG whose header declares width x height (decoding it would allocate width*height*3 bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1000)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _spin_npz(folder, names):
    rng = np.random.default_rng(0)
    n = len(names)
    pose = rng.normal(0, 0.2, (n, 72))
    pose[:, :3] = [np.pi, 0, 0]
    path = folder / "set.npz"
    np.savez(path, imgname=np.array(names), center=np.array([[160.0, 120.0]] * n), scale=np.ones(n), pose=pose,
             shape=rng.normal(0, 1, (n, 10)), gender=np.array(["m"] * n))
    return path


@pytest.fixture
def bad_image_set(tmp_path):
    rng = np.random.default_rng(1)
    image = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "good.jpg"), image)
    whole = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    _png_header_only(tmp_path / "huge.png", 20000, 20000)
    cv2.imwrite(str(tmp_path / "tiny.png"), image[:12, :16])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    return _spin_npz(tmp_path, ["good.jpg", "truncated.jpg", "huge.png", "tiny.png", "garbage.png"])


def test_bad_images_are_failed_samples_with_their_reason(bad_image_set):
    ds = open_dataset(bad_image_set)
    assert ds[0].crop.shape == (224, 224, 3)
    reasons = {}
    for i in range(1, 5):
        with pytest.raises(BadSample) as err:
            ds[i]
        reasons[i] = str(err.value)
    assert "truncated.jpg is truncated" in reasons[1]
    assert "huge.png declares 400,000,000 px, above the limit of 50 megapixels" in reasons[2]
    assert "(16 x 12 px) covers only 0.0% of the sample's box" in reasons[3]
    assert "garbage.png is unreadable" in reasons[4]


def test_a_run_records_bad_images_as_failed(bad_image_set, tmp_path, capsys):
    import pyarrow.parquet as pq
    main(["run", "-m", "pare-demo", "--weights", "random", "-p", "clean", "-d", str(bad_image_set), "--out",
          "out", "--batch-size", "2", "--memory-format", "contiguous", "--no-progress", "--no-report",
          "--device", "cpu"])
    failed = pq.read_table(tmp_path / "out" / "failed.parquet").to_pydict()
    assert failed["sample_index"] == [1, 2, 3, 4]
    assert "is truncated" in failed["reason"][0] and "megapixels" in failed["reason"][1]


# ------------------------------------------------------------------------------------------ pickled code
class Payload:
    """Unpickling this writes a marker file: proof that the reader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_humandata_npz_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.npz"
    np.savez(path, image_path=np.array(["a.jpg"]), bbox_xywh=np.zeros((1, 4)),
             smpl=np.array({"body_pose": Payload(marker)}, dtype=object))
    with pytest.raises(UserError, match=r"evil.npz \[smpl\]: refusing to load class posix.system"):
        open_dataset(path)
    code, err = run_cli(["run", "-m", "pare-demo", "--weights", "random", "-p", "clean", "-d", str(path),
                         "--out", "out", "--device", "cpu", "--no-progress"], capsys)
    assert code == 2 and "refusing to load class" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_3dpw_sequence_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "sequenceFiles" / "test"
    folder.mkdir(parents=True)
    with open(folder / "downtown_walking_00.pkl", "wb") as handle:
        pickle.dump({"sequence": "downtown_walking_00", "poses": [Payload(marker)]}, handle, protocol=2)
    with pytest.raises(UserError, match="downtown_walking_00.pkl: refusing to load class posix.system"):
        open_dataset("3dpw", root=tmp_path)
    assert not marker.exists()


def test_train_resume_state_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    torch.save({"model": {}, "step": 1, "config": Payload(marker)}, tmp_path / "ck.pt.state")
    from occbench.train import _load_state
    with pytest.raises(UserError, match="--resume: refusing .*ck.pt.state .*posix.system"):
        _load_state(tmp_path / "ck.pt.state", "cpu")
    assert not marker.exists()
    code, err = run_cli(["train", "-m", "pare-demo", "-d", "demo", "--steps", "2", "--limit", "2",
                         "--out", str(tmp_path / "ck.pt"), "--resume", "--no-progress"], capsys)
    assert code == 2 and "refusing" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "ck.pt").exists()


def test_checkpoint_pickle_cannot_run_code(tmp_path):
    from occbench.checkpoints import read_state_dict
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": {"evil": Payload(marker)}}, tmp_path / "evil.pth")
    state, container = read_state_dict(tmp_path / "evil.pth")
    assert container == "mmcv" and list(state) == ["w"]
    assert not marker.exists()


def test_smpl_pickle_cannot_run_code(tmp_path):
    from occbench.smpl_io import load_smpl_pkl
    marker = tmp_path / "payload-ran"
    with open(tmp_path / "SMPL_NEUTRAL.pkl", "wb") as handle:
        pickle.dump({"v_template": Payload(marker)}, handle, protocol=2)
    with pytest.raises(UserError, match="refusing to load class posix.system"):
        load_smpl_pkl(tmp_path / "SMPL_NEUTRAL.pkl")
    assert not marker.exists()

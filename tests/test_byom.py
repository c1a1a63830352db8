"""Bring your own model: wrap_model's output forms, builder paths on the command line, the example plugin, the
wrapper's errors, and a wrapped zoo model giving the zoo run's tables bit for bit."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import occbench
from occbench.adapters import Outputs
from occbench.cli import main as cli_main
from occbench.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RUN = dict(limit=2, max_windows=4, batch_size=8, memory_format="contiguous", progress=False, quiet=True)
CLI_RUN = ["--limit", "2", "--max-windows", "4", "--batch-size", "8", "--memory-format", "contiguous",
           "--device", "cpu", "--no-progress"]
TABLES = ("joints", "samples", "predictions", "failed")

# A builder file as a user writes it: pare-demo's network seen through each output form.
MODEL_FILE = '''
import occbench
from occbench.adapters import Outputs
from occbench.camera import weak_perspective_to_translation
from occbench.rotations import rotmat_to_rot6d

PARE = occbench.load_model("pare-demo", device="cpu")
FOCAL = 5000.0 * 96 / 224     # pare-demo's 5000 px at 224 px, in its 96 px input


def smpl_6d(images):
    rotmat, betas, cam, _ = PARE.regress(images)
    return {"rotation": rotmat_to_rot6d(rotmat).reshape(-1, 144), "betas": betas, "cam": cam}


def vertices(images):
    rotmat, betas, cam, _ = PARE.regress(images)
    return {"vertices": PARE.body_model(rotmat=rotmat, betas=betas).vertices, "cam": cam}


def joints_h36m_perspective(images):
    rotmat, betas, cam, _ = PARE.regress(images)
    translation = weak_perspective_to_translation(cam, FOCAL, crop_size=96)
    return {"joints": PARE.body_model(rotmat=rotmat, betas=betas).joints_h36m, "translation": translation,
            "focal_length": FOCAL}


def joints_lsp_fixed_focal(images):
    rotmat, betas, cam, _ = PARE.regress(images)
    translation = weak_perspective_to_translation(cam, FOCAL, crop_size=96)
    return PARE.body_model(rotmat=rotmat, betas=betas).joints_lsp, translation


FORMS = {
    "smpl": (PARE.regress, Outputs(form="smpl", rotation="rotmat")),
    "smpl-6d": (smpl_6d, Outputs(form="smpl", rotation="6d")),
    "vertices": (vertices, Outputs(form="vertices")),
    "joints": (joints_h36m_perspective, Outputs(form="joints", joints="h36m17", camera="perspective")),
    "joints-lsp": (joints_lsp_fixed_focal, Outputs(form="joints", joints="lsp14", camera="perspective",
                                                   focal_length=FOCAL)),
}


def build(form="smpl", checkpoint=None):
    fn, outputs = FORMS[form]
    # pare-demo's network, trained by `occbench train` on 224 px crops resampled to 96 px: the same input
    return occbench.wrap_model(fn, name=f"mine-{form}", input_size=96, outputs=outputs, crop_from="canonical")


def not_a_model():
    return "a string"
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("byom")
    (root / "my_model.py").write_text(MODEL_FILE)
    return root


@pytest.fixture(scope="module")
def mine(work):
    sys.path.insert(0, str(work))
    try:
        import my_model
        yield my_model
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("my_model", None)


@pytest.fixture(scope="module")
def zoo_runs(work, mine):
    """pare-demo's runs through the command line (`--model pare-demo`), the reference of every comparison."""
    runs = {}
    for protocol in ("clean", "occsens40"):
        out = work / f"zoo-{protocol}"
        _cli(["run", "--model", "pare-demo", "-p", protocol, "--out", str(out), "--no-report"] + CLI_RUN)
        runs[protocol] = out
    return runs


def _cli(args):
    try:
        cli_main(args)
    except SystemExit as err:
        assert err.code in (0, None), f"occbench {' '.join(args)} exited with {err.code}"


def _table(run_dir, name):
    return pq.read_table(Path(run_dir) / f"{name}.parquet")


def _joints(run_dir):
    return pd.read_parquet(Path(run_dir) / "joints.parquet")


@pytest.mark.parametrize("protocol", ["clean", "occsens40"])
def test_wrapped_zoo_model_gives_the_zoo_tables_bit_for_bit(work, mine, zoo_runs, protocol):
    out = occbench.run_protocol(mine.build("smpl"), occbench.open_dataset("demo"), protocol,
                                work / f"wrapped-{protocol}", **RUN)
    for name in TABLES:
        ours, theirs = _table(out, name), _table(zoo_runs[protocol], name)
        assert ours.num_rows == theirs.num_rows and (name == "failed" or ours.num_rows > 0)
        assert ours.schema.equals(theirs.schema)
        pd.testing.assert_frame_equal(ours.to_pandas(), theirs.to_pandas(), check_exact=True)  # NaN == NaN here
    config = json.loads((out / "run.json").read_text())
    assert config["model"]["name"] == "mine-smpl" and config["model"]["outside_model"] is True
    assert config["model"]["wrapper"]["outputs"]["rotation"] == "rotmat"
    assert config["model"]["wrapper"]["callable"].endswith("PARE.regress")


@pytest.mark.parametrize("form", ["smpl-6d", "vertices", "joints", "joints-lsp"])
@pytest.mark.parametrize("protocol", ["clean", "occsens40"])
def test_each_output_form_runs_through_run_protocol_and_the_cli(work, mine, zoo_runs, form, protocol):
    reference = _joints(zoo_runs[protocol])
    from_python = occbench.run_protocol(mine.build(form), occbench.open_dataset("demo"), protocol,
                                        work / f"py-{form}-{protocol}", **RUN)
    from_cli = work / f"cli-{form}-{protocol}"
    _cli(["run", "--model", f"{work / 'my_model.py'}:build", "--model-option", f"form={form}", "-p", protocol,
          "--out", str(from_cli), "--no-report"] + CLI_RUN)
    for out in (from_python, from_cli):
        joints = _joints(out)
        assert len(joints) == len(reference) and (joints["window"] >= 0).any() == (protocol != "clean")
        # the same network seen through another form: the same 2D joints, the same aligned 3D error
        np.testing.assert_allclose(joints["pckh"], reference["pckh"])
        np.testing.assert_allclose(joints["pa_mpjpe"], reference["pa_mpjpe"], atol=1e-3)
        if form != "joints-lsp":     # LSP-14 only: the pelvis is the hips' midpoint, not the H36M root
            np.testing.assert_allclose(joints["mpjpe"], reference["mpjpe"], atol=1e-3)
        model = json.loads((Path(out) / "run.json").read_text())["model"]
        assert model["wrapper"]["outputs"]["form"] == form.split("-")[0]
        if form.startswith("joints"):
            assert joints["pve"].isna().all() and reference["pve"].notna().all()
            assert model["unavailable"]["pve"] == "the model predicts joints only (no mesh)"
            assert model["wrapper"]["outputs"]["camera"] == "perspective"
        else:
            np.testing.assert_allclose(joints["pve"], reference["pve"], atol=1e-2)
    cli_model = json.loads((from_cli / "run.json").read_text())["model"]
    assert cli_model["builder"] == f"{work / 'my_model.py'}:build" and cli_model["plugin"] is None


def test_checkpoint_is_passed_to_the_builder_and_its_sha256_recorded(work, mine):
    checkpoint = work / "weights.bin"
    checkpoint.write_bytes(b"my weights")
    out = work / "with-checkpoint"
    _cli(["run", "--model", f"{work / 'my_model.py'}:build", "--checkpoint", str(checkpoint), "-p", "clean",
          "--out", str(out), "--no-report"] + CLI_RUN)
    model = json.loads((out / "run.json").read_text())["model"]
    assert model["checkpoint"] == str(checkpoint) and model["weights"] == "checkpoint"
    assert model["checkpoint_sha256"] == hashlib.sha256(b"my weights").hexdigest()


def test_outside_run_resumes_and_refuses_other_declared_outputs(work, mine, capsys):
    builder = f"{work / 'my_model.py'}:build"
    out = occbench.benchmark(model=builder, protocol="clean", out_dir=work / "resume", device="cpu",
                             model_options={"form": "vertices"}, **RUN)
    first = _joints(out)
    _cli(["run", "--model", builder, "--model-option", "form=vertices", "-p", "clean", "--out", str(out),
          "--no-report"] + CLI_RUN)
    config = json.loads((out / "run.json").read_text())
    assert config["resumed"] == 1 and config["model"]["builder"] == builder
    pd.testing.assert_frame_equal(_joints(out), first, check_exact=True)
    with pytest.raises(SystemExit) as exit_info:    # other declared outputs: another run, not a resume
        cli_main(["run", "--model", builder, "--model-option", "form=joints", "-p", "clean", "--out", str(out),
                  "--no-report"] + CLI_RUN)
    assert exit_info.value.code == 2
    assert "holds a different run (model differs" in capsys.readouterr().err


def test_joints_only_report_has_no_mesh_section_and_says_why(work, mine):
    run_dir = occbench.run_protocol(mine.build("joints"), occbench.open_dataset("demo"), "occsens40",
                                    work / "report-joints", **RUN)
    index = occbench.write_report([run_dir], work / "report-joints-html")
    page = index.read_text()
    assert 'id="heatmaps"' in page                      # the joint-based sections are there
    assert 'id="meshes"' not in page and 'class="occmesh"' not in page
    assert not list((work / "report-joints-html" / "meshes").iterdir())
    assert "sensitivity meshes unavailable: the model predicts joints only (no mesh)" in page
    assert "PVE unavailable: the model predicts joints only (no mesh)" in page
    assert "outside model (builder my_model.joints_h36m_perspective; outputs form=joints" in page


# ------------------------------------------------------------------------------------------ mistakes
def _images(n=2, size=32):
    return torch.rand(n, 3, size, size)


def _wrapped(result, outputs=None, **kwargs):
    return occbench.wrap_model(lambda images: result(images), name="bad", input_size=32,
                               outputs=outputs or Outputs(), **kwargs)


def test_wrong_output_shape_names_the_wrapper_and_what_was_expected():
    model = _wrapped(lambda x: {"rotation": torch.zeros(len(x), 24, 3), "betas": torch.zeros(len(x), 10),
                                "cam": torch.ones(len(x), 3)})
    with pytest.raises(UserError, match=r"wrapped model 'bad' \(.*\): output 'rotation' has shape \(2, 24, 3\), "
                                        r"expected \(2, 24, 3, 3\) or \(2, 216\)"):
        model.predict(_images())
    joints = _wrapped(lambda x: {"joints": torch.zeros(len(x), 15, 3), "cam": torch.ones(len(x), 3)},
                      Outputs(form="joints", joints="lsp14"))
    with pytest.raises(UserError, match=r"output 'joints' has shape \(2, 15, 3\), expected \(2, 14, 3\)"):
        joints.predict(_images())


def test_nans_missing_keys_and_wrong_types_are_refused():
    nan = _wrapped(lambda x: {"vertices": torch.full((len(x), 6890, 3), float("nan")),
                              "cam": torch.ones(len(x), 3)}, Outputs(form="vertices"))
    with pytest.raises(UserError, match="wrapped model 'bad' .*output 'vertices' holds NaN or inf values"):
        nan.predict(_images())
    missing = _wrapped(lambda x: {"rotation": torch.zeros(len(x), 24, 3, 3)})
    with pytest.raises(UserError, match=r"output has no 'betas', 'cam'; expected a dict with keys rotation, "
                                        r"betas, cam"):
        missing.predict(_images())
    array = _wrapped(lambda x: "not a tensor")
    with pytest.raises(UserError, match="returned str; expected a dict with keys rotation, betas, cam"):
        array.predict(_images())


def test_bad_declarations_are_refused():
    with pytest.raises(UserError, match=r"Outputs\(rotation='quaternion'\): valid: rotmat, axis-angle, 6d"):
        Outputs(rotation="quaternion")
    with pytest.raises(UserError, match=r"outputs has unknown fields \['rotations'\]; valid: form, rotation"):
        occbench.wrap_model(lambda x: x, name="mine", outputs={"rotations": "6d"})
    with pytest.raises(UserError, match="that is a zoo model's name"):
        occbench.wrap_model(lambda x: x, name="pare-demo")
    with pytest.raises(UserError, match=r"normalization='caffe'; valid: 'imagenet', None"):
        occbench.wrap_model(lambda x: x, name="mine", normalization="caffe")


def test_builder_mistakes_are_one_line_errors(work, mine, capsys):
    from occbench.plugins import load_outside_model
    with pytest.raises(UserError, match=r"builder .*my_model.py:not_a_model returned str, expected a model made "
                                        r"with occbench.wrap_model"):
        load_outside_model(f"{work / 'my_model.py'}:not_a_model", device="cpu")
    broken = work / "broken.py"
    broken.write_text("import no_such_package_for_occbench\n")
    with pytest.raises(UserError, match=r"broken.py' does not import \(ModuleNotFoundError: No module named "
                                        r"'no_such_package_for_occbench'\)"):
        load_outside_model(f"{broken}:build")
    with pytest.raises(UserError, match=r"module 'no_such_package_for_occbench.models' does not import "
                                        r"\(ModuleNotFoundError"):
        load_outside_model("no_such_package_for_occbench.models:build")
    with pytest.raises(UserError, match="has no function 'nope'"):
        load_outside_model(f"{work / 'my_model.py'}:nope")
    with pytest.raises(UserError, match=r"does not accept backbone"):
        load_outside_model(f"{work / 'my_model.py'}:build", backbone="resnet50")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", "--model", f"{broken}:build", "-p", "clean", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model") and "No module named 'no_such_package_for_occbench'" in err
    assert len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ the plugin
@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """examples/plugin pip-installed (offline, no build isolation) into a folder put on PYTHONPATH."""
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(REPO / "examples" / "plugin", root / "source")   # build files stay out of the repo
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True)
    return target


def _occbench(args, plugin_path, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "occbench"] + args, capture_output=True, text=True, env=env,
                          cwd=cwd)


def test_installed_plugin_is_listed_and_runs_by_name(plugin_path, tmp_path):
    listing = _occbench(["models"], plugin_path, tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "tiny-hmr: Tiny HMR-style example regressor" in listing.stdout
    assert "outside model from plugin occbench-tiny-plugin 0.1.0: builder occbench_tiny_plugin:build" \
        in listing.stdout
    as_json = [json.loads(line) for line in _occbench(["models", "--json"], plugin_path, tmp_path).stdout.splitlines()]
    assert {"name": "tiny-hmr", "package": "occbench-tiny-plugin", "version": "0.1.0"}.items() <= \
        next(m for m in as_json if m["name"] == "tiny-hmr").items()
    result = _occbench(["run", "--model", "tiny-hmr", "-p", "occsens40", "--out", "run"] + CLI_RUN,
                       plugin_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tiny-hmr | occsens40 | demo | 2 samples, 0 failed" in result.stdout
    model = json.loads((tmp_path / "run" / "run.json").read_text())["model"]
    assert model["plugin"] == {"name": "tiny-hmr", "package": "occbench-tiny-plugin", "version": "0.1.0"}
    assert model["builder"] == "occbench_tiny_plugin:build" and model["input_size"] == 64
    assert model["wrapper"]["outputs"]["rotation"] == "axis-angle"
    page = next((tmp_path / "reports" / "run").glob("index.html")).read_text()
    assert "outside model (plugin occbench-tiny-plugin 0.1.0, builder occbench_tiny_plugin:build" in page
    unknown = _occbench(["run", "--model", "tiny-hmr-typo", "-p", "clean"], plugin_path, tmp_path)
    assert unknown.returncode == 2 and "tiny-hmr" in unknown.stderr and "tiny-hmr-typo" in unknown.stderr

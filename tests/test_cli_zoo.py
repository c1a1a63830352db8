"""``occbench models`` and ``occbench check-checkpoint`` (CLI wiring, with a tiny stand-in network)."""
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import occbench.models
from helpers import save_in_official_container
from occbench.cli import cli, main
from occbench.models import get_entry, model_names


class Tiny(nn.Module):
    name = "tiny"

    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.head = nn.Linear(width, 2)


@pytest.fixture
def fake_zoo(monkeypatch):
    """build_model returns a Tiny network; records the calls."""
    calls = []

    def build_model(name, mean_params=None, **options):
        calls.append((name, options))
        return Tiny(**options)

    monkeypatch.setattr(occbench.models, "build_model", build_model)
    return calls


def test_models_lists_every_entry_without_building(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("occbench models must not build a network")

    monkeypatch.setattr(occbench.models, "build_model", no_build)
    (tmp_path / "model_checkpoint.pt").write_bytes(b"x")
    result = CliRunner().invoke(cli, ["models", "--checkpoint-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in model_names():
        assert f"\n{name}: " in "\n" + result.output
        entry = get_entry(name)
        assert entry.checkpoint_files[0] in result.output
    assert f"found: {tmp_path / 'model_checkpoint.pt'}" in result.output        # spin's file is present
    assert "source: https://github.com/mkocabas/PARE" in result.output        # pare's is not
    assert "input 320x320" in result.output                                       # 3DNBF's input size

    monkeypatch.setenv("OCCBENCH_CHECKPOINT_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, ["models", "--json"])
    records = {r["name"]: r for r in map(json.loads, result.output.splitlines())}
    assert set(records) == set(model_names())
    assert records["spin"]["checkpoint_found"] == str(tmp_path / "model_checkpoint.pt")
    assert records["pare"]["checkpoint_found"] is None


def test_check_checkpoint_ok(tmp_path, fake_zoo):
    # pare's entry strips `model.` and accepts the trainer-level SMPL copies
    state = {f"model.{k}": v for k, v in Tiny().state_dict().items()}
    state["smpl.shapedirs"] = torch.zeros(2)
    path = save_in_official_container(state, tmp_path / "pare_checkpoint.ckpt", container="lightning")
    result = CliRunner().invoke(cli, ["check-checkpoint", "--model", "pare", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: pare")
    assert "4/4 model tensors matched, 1 known-unused" in result.output
    assert fake_zoo == [("pare", {})]


def test_check_checkpoint_mismatch_exits_1_and_names_keys(tmp_path, fake_zoo):
    state = Tiny().state_dict()
    state["head.weight"] = torch.zeros(3, 4)
    state["stray.bias"] = torch.zeros(1)
    del state["conv.bias"]
    path = save_in_official_container(state, tmp_path / "model_checkpoint.pt", container="model-dict")
    result = CliRunner().invoke(cli, ["check-checkpoint", "--model", "spin", str(path)])
    assert result.exit_code == 1
    for text in ("MISMATCH: spin", "conv.bias", "stray.bias", "head.weight: file (3, 4) vs model (2, 4)",
                 "--allow-partial"):
        assert text in result.output, text
    partial = CliRunner().invoke(cli, ["check-checkpoint", "--model", "spin", str(path), "--allow-partial"])
    assert partial.exit_code == 0
    assert "2 of 4 tensors would load" in partial.output
    with pytest.raises(SystemExit) as info:                 # the console entry point's exit status
        main(["check-checkpoint", "--model", "spin", str(path)])
    assert info.value.code == 1
    as_json = CliRunner().invoke(cli, ["check-checkpoint", "--model", "spin", str(path), "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.output)["missing"] == ["conv.bias"]


def test_check_checkpoint_passes_architecture_options(tmp_path, fake_zoo):
    path = save_in_official_container(Tiny(width=6).state_dict(), tmp_path / "w6.pt")
    result = CliRunner().invoke(cli, ["check-checkpoint", "--model", "spin", "-o", "width=6", str(path)])
    assert result.exit_code == 0, result.output
    assert fake_zoo == [("spin", {"width": 6})]
    assert CliRunner().invoke(cli, ["check-checkpoint", "--model", "spin", str(path)]).exit_code == 1


def test_check_checkpoint_bad_inputs(tmp_path, fake_zoo, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SystemExit) as info:
        main(["check-checkpoint", "--model", "spin", str(bad)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "broken.pt" in err and "Traceback" not in err
    result = CliRunner().invoke(cli, ["check-checkpoint", "--model", "nosuchmodel", str(bad)])
    assert result.exit_code == 2 and "unknown model 'nosuchmodel'" in result.output

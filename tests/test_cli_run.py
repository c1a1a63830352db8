"""``occbench run`` options that reach the model loader: --allow-partial, --smpl-dir, --data-dir, -o."""
import json

import pytest

import occbench
from occbench.checkpoints import read_state_dict, save_state_dict
from occbench.cli import main
from occbench.keyvalue import parse_pair, parse_pairs

pytestmark = pytest.mark.usefixtures("single_thread")

QUICK = ["--protocol", "clean", "--limit", "2", "--batch-size", "2", "--memory-format", "contiguous",
         "--device", "cpu", "--no-progress", "--no-report"]


@pytest.fixture(scope="module")
def partial_checkpoint(tmp_path_factory):
    """The bundled demo weights with one tensor removed, in the same Lightning container."""
    import occbench.zoo
    state, container = read_state_dict(occbench.zoo.find_checkpoint("pare-demo"))
    dropped = next(key for key in state if key.endswith("weight") and "head" in key)
    del state[dropped]
    path = save_state_dict(state, tmp_path_factory.mktemp("partial") / "partial.ckpt", container=container)
    return path, dropped.removeprefix("model.")


def test_run_refuses_a_partial_checkpoint_and_names_the_fix(tmp_path, capsys, partial_checkpoint):
    path, dropped = partial_checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", "pare-demo", "--checkpoint", str(path), "--out", str(tmp_path / "r"), *QUICK])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and dropped in err and "--allow-partial" in err
    assert not (tmp_path / "r").exists()


def test_run_allow_partial_labels_the_results(tmp_path, partial_checkpoint):
    path, dropped = partial_checkpoint
    main(["run", "-m", "pare-demo", "--checkpoint", str(path), "--allow-partial", "-o", "input_size=96",
          "--out", str(tmp_path / "r"), *QUICK])
    config = json.loads((tmp_path / "r" / "run.json").read_text())
    report = config["model_provenance"]["checkpoint_report"]
    assert report["partial"] and report["allow_partial"] and report["missing"] == [dropped]
    assert config["comparable"] is False
    assert config["model_provenance"]["options"]["input_size"] == 96
    assert any("--allow-partial" in warning for warning in occbench.load_run(tmp_path / "r").warnings())


def test_run_passes_smpl_dir_and_data_dir_to_the_body_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for option in ("--smpl-dir", "--data-dir"):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "-m", "pare-demo", "--weights", "random", option, str(tmp_path / "empty"),
                  "--out", str(tmp_path / "r"), *QUICK])
        assert exit_info.value.code == 2
        assert str(tmp_path / "empty") in capsys.readouterr().err


def test_one_key_value_parser():
    assert parse_pair("x=true") == parse_pair("x=True") == ("x", True)
    assert parse_pair("stride=20") == ("stride", 20) and parse_pair("lr=1e-3") == ("lr", 0.001)
    assert parse_pair("head=3x256") == ("head", "3x256") and parse_pair("docs=[1, 2]") == ("docs", [1, 2])
    assert parse_pairs(["a=1", "b = two", "a=3"]) == {"a": 3, "b": "two"}
    with pytest.raises(occbench.errors.UserError, match="--set 'stride': expected KEY=VALUE"):
        parse_pair("stride", "--set")
    with pytest.raises(occbench.errors.UserError, match="expected KEY=VALUE"):
        parse_pair("=5")


def test_every_command_reads_model_options_alike(tmp_path, monkeypatch):
    """run, train and check-checkpoint hand `-o` to the same parser: x=true is True in each."""
    import occbench.keyvalue
    seen = []
    original = occbench.keyvalue.parse_pairs

    def spy(pairs, option="-o"):
        result = original(pairs, option)
        if option == "--model-option":
            seen.append(result)
            raise SystemExit(0)
        return result

    monkeypatch.setattr(occbench.keyvalue, "parse_pairs", spy)
    for argv in (["run", "-m", "pare-demo", "-p", "clean", "-o", "x=true"],
                 ["train", "-m", "pare-demo", "-d", "demo", "--steps", "1", "--out", str(tmp_path / "t.pt"),
                  "-o", "x=true"],
                 ["check-checkpoint", "--model", "pare-demo", "-o", "x=true", str(tmp_path / "none.pt")]):
        with pytest.raises(SystemExit):
            main(argv)
    assert seen == [{"x": True}] * 3


def test_workers_rebuild_a_partial_load_the_same_way(partial_checkpoint):
    """--allow-partial and the body folders reach the model recipe the parallel workers rebuild from."""
    from occbench.parallel import model_recipe, model_digest
    from occbench.zoo import load_model
    path, _ = partial_checkpoint
    model = load_model("pare-demo", checkpoint=path, device="cpu", allow_partial=True)
    assert model.provenance["loader"] == {"allow_partial": True}
    recipe = model_recipe(model)
    assert recipe.loader == {"allow_partial": True}
    assert model_digest(recipe.build("cpu")) == recipe.digest
    assert "loader" not in load_model("pare-demo", device="cpu").provenance   # nothing given, nothing recorded

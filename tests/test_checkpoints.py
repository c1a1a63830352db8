"""Checkpoint reading and strict loading, on a tiny module and on the official layout manifests."""
import hashlib
import sys
import types

import pytest
import torch
from torch import nn

from helpers import model_layout_from_manifest, random_state_dict_from_manifest, save_in_official_container
from occbench.checkpoints import (CONTAINERS, check_checkpoint, load_checkpoint_into, manifest_path, read_manifest,
                                  read_state_dict)
from occbench.errors import UserError


class Tiny(nn.Module):
    name = "tiny"

    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 2)
        self.register_buffer("init_pose", torch.zeros(6))


def _trained_state(seed=1, width=4):
    torch.manual_seed(seed)
    model = Tiny(width)
    for p in model.parameters():
        nn.init.normal_(p)
    model.bn.running_mean.normal_()
    model.bn.num_batches_tracked.fill_(7)
    model.init_pose.normal_()
    return model.state_dict()


def _assert_equal_state(model, state):
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key].to(value.dtype)), key


@pytest.mark.parametrize("container,prefix,expected", [
    ("lightning", "model.", "lightning"),
    ("mmcv", "", "mmcv"),
    ("model-dict", "", "model-dict"),
    ("plain", "", "plain"),
])
def test_round_trip_through_each_container(tmp_path, container, prefix, expected):
    state = _trained_state()
    path = save_in_official_container(state, tmp_path / "ckpt.pt", container=container, prefix=prefix)
    stored, found = read_state_dict(path)
    assert found == expected
    assert list(stored) == [prefix + k for k in state]
    model = Tiny()
    report = load_checkpoint_into(model, path, strip_prefixes=(prefix,) if prefix else ())
    assert report.ok and report.applied
    assert report.container == expected
    assert len(report.loaded) == len(state) == report.n_model_tensors
    _assert_equal_state(model, state)
    if container in ("lightning", "mmcv"):  # their extra pickled objects were not executed, only skipped
        assert report.opaque_objects
    summary = report.summary()
    assert summary["ok"] and summary["counts"]["loaded"] == len(state)
    assert summary["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_legacy_torch_format_is_read(tmp_path):
    # SPIN's model_checkpoint.pt predates the zip format
    state = _trained_state()
    path = tmp_path / "model_checkpoint.pt"
    torch.save({"model": state, "optimizer": {}}, path, _use_new_zipfile_serialization=False)
    model = Tiny()
    assert load_checkpoint_into(model, path).container == "model-dict"
    _assert_equal_state(model, state)


def test_hyperparameters_of_an_uninstalled_package_do_not_block_loading(tmp_path):
    # PARE's .ckpt pickles yacs config objects: occbench must not need (or run) that package.
    fake = types.ModuleType("notinstalled_cfg")

    class CfgNode(dict):
        def __reduce__(self):
            return (CfgNode, (dict(self),))

    CfgNode.__module__, CfgNode.__qualname__ = "notinstalled_cfg", "CfgNode"
    fake.CfgNode = CfgNode
    sys.modules["notinstalled_cfg"] = fake
    try:
        obj = {"state_dict": _trained_state(), "epoch": 3, "hyper_parameters": CfgNode(lr=1.0)}
        path = tmp_path / "pare.ckpt"
        torch.save(obj, path)
    finally:
        del sys.modules["notinstalled_cfg"]
    stored, container = read_state_dict(path)
    assert container == "lightning" and len(stored) == len(_trained_state())
    report = check_checkpoint(Tiny(), path)
    assert report.ok and report.opaque_objects == ["notinstalled_cfg.CfgNode"]


def test_restricted_reader_never_runs_pickled_code(tmp_path):
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(flag), "w"))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _trained_state(), "epoch": 0, "hyper_parameters": Evil()}, path)
    report = check_checkpoint(Tiny(), path)
    # the pickled global's name: io.open up to Python 3.11, _io.open from 3.12
    assert report.ok and report.opaque_objects in (["io.open"], ["_io.open"])
    assert not flag.exists()


def test_mismatches_are_named_and_refused(tmp_path):
    state = _trained_state()
    del state["head.bias"]                                   # missing
    state["extra.weight"] = torch.zeros(3)                   # unexpected
    state["conv.weight"] = torch.zeros(5, 3, 3, 3)           # mis-shaped
    state["bn.num_batches_tracked"] = torch.tensor(1.5)      # float where the model has int64
    path = save_in_official_container(state, tmp_path / "bad.pth", container="model-dict")
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_checkpoint_into(model, path)
    message = str(info.value)
    for name in ("head.bias", "extra.weight", "conv.weight", "(5, 3, 3, 3)", "(4, 3, 3, 3)",
                 "bn.num_batches_tracked", str(path), "--allow-partial"):
        assert name in message, name
    assert "\n" not in message
    _assert_equal_state(model, before)                       # refused -> untouched

    report = check_checkpoint(Tiny(), path)
    assert not report.ok
    assert report.missing == ["head.bias"]
    assert report.unexpected == ["extra.weight"]
    assert report.misshaped == [("conv.weight", (5, 3, 3, 3), (4, 3, 3, 3))]
    assert [t[0] for t in report.mistyped] == ["bn.num_batches_tracked"]
    text = report.describe()
    assert text.startswith("MISMATCH") and "conv.weight: file (5, 3, 3, 3) vs model (4, 3, 3, 3)" in text


def test_error_message_lists_at_most_twenty_names_per_category(tmp_path):
    state = {f"junk.{i}": torch.zeros(1) for i in range(30)}
    state.update(_trained_state())
    path = save_in_official_container(state, tmp_path / "junk.pt")
    with pytest.raises(UserError) as info:
        load_checkpoint_into(Tiny(), path)
    message = str(info.value)
    assert "30 unexpected key(s)" in message and "(+10 more)" in message
    assert "junk.19" in message and "junk.20," not in message


def test_allow_partial_loads_the_rest(tmp_path):
    state = _trained_state()
    state["head.weight"] = torch.zeros(3, 4)                 # wrong shape, the rest is fine
    path = save_in_official_container(state, tmp_path / "partial.pt")
    model = Tiny()
    original_head = model.head.weight.detach().clone()
    report = load_checkpoint_into(model, path, allow_partial=True)
    assert not report.ok and report.applied and report.summary()["partial"]
    assert report.misshaped == [("head.weight", (3, 4), (2, 4))]
    assert torch.equal(model.head.weight, original_head)
    assert torch.equal(model.conv.weight, state["conv.weight"])
    assert len(report.loaded) == len(state) - 1


def test_known_unused_keys_are_accepted_and_listed(tmp_path):
    state = {f"model.{k}": v for k, v in _trained_state().items()}
    state["model.backbone.final_layer.weight"] = torch.zeros(2)   # stored, not used by inference
    state["smpl.shapedirs"] = torch.zeros(3)                      # trainer-level copy, no prefix
    state["model.smpl.shapedirs"] = torch.zeros(3)                # same name once stripped
    path = save_in_official_container(state, tmp_path / "pare.ckpt", container="lightning")
    with pytest.raises(UserError, match="backbone.final_layer"):
        load_checkpoint_into(Tiny(), path, strip_prefixes=("model.",))
    report = load_checkpoint_into(Tiny(), path, strip_prefixes=("model.",),
                                  known_unused=(r"^smpl\.", r"^backbone\.final_layer\."))
    assert report.ok
    assert sorted(report.known_unused) == ["model.backbone.final_layer.weight", "model.smpl.shapedirs",
                                           "smpl.shapedirs"]
    assert "3 known-unused" in report.describe()
    assert report.summary()["counts"]["known_unused"] == 3


def test_dtype_is_cast_to_the_model(tmp_path):
    state = {k: (v.double() if v.is_floating_point() else v) for k, v in _trained_state().items()}
    path = save_in_official_container(state, tmp_path / "f64.pt")
    model = Tiny()
    report = load_checkpoint_into(model, path)
    assert report.ok and model.conv.weight.dtype == torch.float32
    assert ("conv.weight", "float64", "float32") in report.cast
    torch.testing.assert_close(model.conv.weight, state["conv.weight"].float())


def test_truncated_and_missing_files_give_clear_errors(tmp_path):
    path = save_in_official_container(_trained_state(), tmp_path / "full.pt", container="model-dict")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated.pt.*truncated or corrupt"):
        read_state_dict(truncated)
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": _trained_state()}, legacy, _use_new_zipfile_serialization=False)
    cut = tmp_path / "legacy_cut.pt"
    cut.write_bytes(legacy.read_bytes()[:100])
    with pytest.raises(UserError, match="legacy_cut.pt.*truncated or corrupt"):
        read_state_dict(cut)
    with pytest.raises(UserError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    not_a_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(UserError, match="no state dict found"):
        read_state_dict(not_a_state)


def test_sha256_is_streamed_file_hash(tmp_path):
    path = save_in_official_container(_trained_state(), tmp_path / "x.pt")
    report = check_checkpoint(Tiny(), path)
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------ manifests (models/manifests)


def test_read_manifest_matches_the_readme_counts():
    # README: SPIN 331 entries, 27.0M values; PARE 1946 entries, 32.9M in the network (`model.` minus SMPL)
    rows = read_manifest(manifest_path("spin_hmr.tsv"))
    assert len(rows) == 331
    assert abs(sum(torch.Size(shape).numel() for _, shape, _ in rows) - 27.0e6) < 0.05e6
    rows = read_manifest(manifest_path("pare_hrnet_w32.tsv"))
    assert len(rows) == 1946
    network = [s for k, s, _ in rows if k.startswith("model.") and not k.startswith("model.smpl.")]
    assert abs(sum(torch.Size(shape).numel() for shape in network) - 32.9e6) < 0.05e6
    rows = read_manifest(manifest_path("3dnbf_r50.tsv"))
    assert ("feature_bank.accumulate_num", (858,), "int64") in rows
    assert all(dtype in ("float32", "int64") for _, _, dtype in rows)


def test_random_state_dict_from_manifest_is_exact_and_deterministic(tmp_path):
    tsv = manifest_path("spin_hmr.tsv")
    rows = read_manifest(tsv)
    a = random_state_dict_from_manifest(tsv, seed=0)
    assert [(k, tuple(v.shape), str(v.dtype)[6:]) for k, v in a.items()] == rows
    assert 0.015 < float(a["fc1.weight"].std()) < 0.025
    path = save_in_official_container(a, tmp_path / "model_checkpoint.pt", container="model-dict")
    stored, container = read_state_dict(path)
    assert container == "model-dict" and list(stored) == [k for k, _, _ in rows]
    # determinism and the prefix option, on a small manifest
    small = tmp_path / "small.tsv"
    small.write_text("model.a.weight\t(3, 2)\tfloat32\nmodel.a.n\t()\tint64\nsmpl.v\t(4,)\tfloat64\n")
    b1, b2 = (random_state_dict_from_manifest(small, seed=5, strip_prefix="model.") for _ in range(2))
    c = random_state_dict_from_manifest(small, seed=6, strip_prefix="model.")
    assert list(b1) == ["a.weight", "a.n", "smpl.v"] and b1["smpl.v"].dtype == torch.float64
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    assert not torch.equal(b1["a.weight"], c["a.weight"])
    bad = tmp_path / "bad.tsv"
    bad.write_text("model.a.weight\t[3, 2]\tfloat32\n")
    with pytest.raises(UserError, match="bad.tsv line 1"):
        read_manifest(bad)


def test_model_layout_from_manifest_strips_prefixes_and_known_unused():
    tsv = manifest_path("pare_hrnet_w32.tsv")
    from occbench.models import get_entry
    entry = get_entry("pare")
    layout = model_layout_from_manifest(tsv, entry.strip_prefixes, entry.known_unused)
    keys = [k for k, _, _ in layout]
    assert keys and not any(k.startswith(("model.", "smpl.", "backbone.final_layer.")) for k in keys)
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys)
    stored = {k for k, _, _ in read_manifest(tsv)}
    assert all("model." + k in stored for k in keys)
    assert abs(sum(torch.Size(s).numel() for _, s, _ in layout) - 32.9e6) < 0.2e6


def test_generic_state_dict_container(tmp_path):
    path = tmp_path / "bopr.pt"
    torch.save({"state_dict": _trained_state(), "provenance": {"trained_by": "occbench"}}, path)
    stored, container = read_state_dict(path)
    assert container == "state-dict" and container in CONTAINERS
    assert check_checkpoint(Tiny(), path).ok

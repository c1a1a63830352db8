"""Built-in protocol definitions and TOML validation."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from occbench.errors import UserError
from occbench.keyvalue import parse_pair
from occbench.protocol import builtin_names, load_protocol

REQUIRED = (["clean", "occsens40", "occsens40-dense", "advocc40", "advocc80", "doc-sweep", "voc-objects",
             "bar-table1", "circle-table1", "rect-table1"]
            + [f"{p}-doc{d}" for p in ("bar", "circle", "rect") for d in range(1, 6)])


def test_every_builtin_is_listed_and_loads():
    names = builtin_names()
    assert set(REQUIRED) <= set(names)
    for name in names:
        protocol = load_protocol(name)
        assert protocol.name == name and protocol.description


def test_builtins_match_the_reference():
    occsens = load_protocol("occsens40")
    assert (occsens.size, occsens.stride, occsens.fill, occsens.indexing, occsens.reference) == \
        (40, 40, "mean", "top-left", "gt")
    dense = load_protocol("occsens40-dense")
    assert (dense.stride, dense.indexing) == (8, "center")
    assert load_protocol("occsens40-dense-gtfree").reference == "clean"
    for name, size in (("advocc40", 40), ("advocc80", 80)):
        p = load_protocol(name)
        assert (p.size, p.stride, p.fill, p.textures, p.visible_only, p.report, p.reduction) == \
            (size, 10, "texture", "dtd", True, "worst", "pooled-visible")
    sweep = load_protocol("doc-sweep")
    assert sweep.patterns == ["bar", "circle", "rect"] and sweep.docs == [1, 2, 3, 4, 5]
    assert sweep.n_windows() == 210
    assert load_protocol("rect-doc4").docs == [4] and load_protocol("rect-doc4").patterns == ["rect"]
    table1 = load_protocol("bar-table1")
    assert (table1.placement, table1.copies) == ("random-joint", 1)


def test_wrong_field_names_the_field_and_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nkind = "occsens"\nstrde = 20\n')
    with pytest.raises(UserError, match=r"mine\.toml: unknown field 'strde'; valid fields: .*stride"):
        load_protocol(str(path))
    path.write_text('name = "mine"\nkind = "occsens"\nfill = "grey"\n')
    with pytest.raises(UserError, match=r"field 'fill' = 'grey' is not one of mean, color"):
        load_protocol(str(path))
    path.write_text('name = "mine"\nkind = "occsens"\nstride = "ten"\n')
    with pytest.raises(UserError, match=r"field 'stride' must be an integer"):
        load_protocol(str(path))
    path.write_text('name = "mine"\nkind = "hkmr"\ndocs = [6]\n')
    with pytest.raises(UserError, match=r"field 'docs'"):
        load_protocol(str(path))
    path.write_text('kind = "occsens"\n')
    with pytest.raises(UserError, match="missing required field 'name'"):
        load_protocol(str(path))
    with pytest.raises(UserError, match="unknown protocol 'occsens41'; valid names: advocc40"):
        load_protocol("occsens41")


def test_user_file_and_overrides(tmp_path):
    path = tmp_path / "coarse.toml"
    path.write_text('name = "coarse"\nkind = "occsens"\nsize = 60\nstride = 20\n')
    p = load_protocol(str(path))
    assert p.n_windows() == 10 * 10 and p.source == str(path)
    q = load_protocol("occsens40", stride=20)
    assert q.n_windows() == 11 * 11 and q.fingerprint() != load_protocol("occsens40").fingerprint()
    assert parse_pair("stride=20", "--set") == ("stride", 20)
    assert parse_pair("fill=texture", "--set") == ("fill", "texture")
    assert parse_pair("docs=[1, 2]", "--set") == ("docs", [1, 2])
    with pytest.raises(UserError, match="unknown field 'strid'"):
        load_protocol("occsens40", strid=20)


def test_hkmr_windows_skip_joints_without_2d_and_table1_picks_a_valid_joint():
    joints2d = np.random.default_rng(1).uniform(20, 200, (14, 2))
    valid = np.ones(14, bool)
    valid[[3, 9]] = False
    table = load_protocol("doc-sweep").windows("s", 224, 0, joints2d=joints2d, joints2d_valid=valid)
    assert len(table["window"]) == 15 * 12 and not np.isin(table["target_joint"], [3, 9]).any()
    assert table["window"].max() == 209                      # window ids keep their (pattern, doc, joint) meaning
    picks = {int(load_protocol("circle-table1").windows(f"s{i}", 224, 0, joints2d=joints2d,
                                                         joints2d_valid=valid)["target_joint"][0])
             for i in range(40)}
    assert len(picks) > 5 and not picks & {3, 9}
    with pytest.raises(UserError, match="GT 2D"):
        load_protocol("bar-doc1").windows("s", 224, 0, joints2d=None)


def test_protocols_command_lists_every_name():
    from occbench.cli import cli
    result = CliRunner().invoke(cli, ["protocols"])
    assert result.exit_code == 0
    for name in REQUIRED:
        assert f"\n{name} " in "\n" + result.output
    assert "stride=10" in result.output


def test_voc_without_root_is_a_missing_asset_error():
    from occbench.assets import MissingAssetError
    from occbench.voc import VocOccluders
    with pytest.raises(MissingAssetError, match="voc-root"):
        VocOccluders.open(None)


@pytest.mark.parametrize("name, count", [("occsens40", 36), ("occsens40-dense", 576), ("advocc40", 400),
                                         ("advocc80", 256)])
def test_the_same_windows_at_every_input_size(name, count):
    """The 224 px grid's positions are scaled one by one: every model gets the protocol's window count and the
    same relative positions (a stride rounded on its own gave 784 occsens40-dense windows at 96 px)."""
    from occbench import windows as win
    protocol = load_protocol(name)
    reference = None
    for size in (96, 224, 320):
        assert protocol.n_windows(size) == count
        n, origins, side = win.grid_positions(protocol.size, protocol.stride, size)
        assert n * n == count and side == win.scale_px(protocol.size, size)
        relative = origins * 224 / size                    # back in 224 px: within half a pixel of the grid
        np.testing.assert_allclose(relative, np.arange(n) * protocol.stride, atol=0.5 * 224 / size + 1e-9)
        if protocol.kind == "occsens":
            table = protocol.windows("s", size, seed=0)
            assert len(table["window"]) == count
            np.testing.assert_array_equal(table["occ_cx"] - table["occ_hw"], origins[table["grid_col"]])
            if reference is None:
                reference = (table["grid_row"], table["grid_col"])
            np.testing.assert_array_equal(table["grid_row"], reference[0])

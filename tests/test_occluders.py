"""Occluder geometry and fills against REFERENCE.md 1 and 5: grid counts and positions, clipping, ImageNet-mean
fill, strict visibility test, DoC sizes, scaling to 320 px, texture crops, counter-based reproducibility."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import fake_voc
from occbench import occluders as occ
from occbench import windows
from occbench.protocol import load_protocol
from occbench.voc import VocOccluders


def masks_of(protocol, input_size=224, joints2d=None, seed=0, sample_id="s", textures=None):
    table = protocol.windows(sample_id, input_size, seed, joints2d=joints2d, textures=textures)
    return table, occ.occluder_masks(table, input_size, input_size, "cpu")[:, 0].numpy()


def test_scale_px_rounds_half_up_to_the_reference_values():
    assert [windows.scale_px(v, 320) for v in (40, 80, 10)] == [57, 114, 14]
    assert [windows.scale_px(v, 224) for v in (40, 80, 10, 8)] == [40, 80, 10, 8]
    assert windows.scale_px(7, 448) == 14 and windows.scale_px(0.25, 224) == 0 and windows.scale_px(0.5, 224) == 1


@pytest.mark.parametrize("name,input_size,count,size", [
    ("occsens40", 224, 36, 40), ("advocc40", 224, 400, 40), ("advocc80", 224, 256, 80),
    ("advocc40", 320, 400, 57), ("advocc80", 320, 256, 114)])
def test_window_counts(name, input_size, count, size):
    protocol = load_protocol(name)
    assert protocol.n_windows(input_size) == count
    table = protocol.windows("s", input_size, 0, textures=occ.TextureBank(occ.skimage_source(), input_size)
                             if protocol.uses_textures else None)
    assert len(table["window"]) == count
    assert protocol.grid(input_size)[0] == size


def test_occsens40_grid_positions_and_clipping():
    table, masks = masks_of(load_protocol("occsens40"))
    assert list(table["x0"][:6]) == [0, 40, 80, 120, 160, 200]
    assert list(table["y0"][::6]) == [0, 40, 80, 120, 160, 200]
    # row-major (row = y, col = x), window n = row * 6 + col, as PARE's idx_dict
    assert (table["grid_row"][7], table["grid_col"][7]) == (1, 1)
    for n in (0, 7, 5, 30, 35):
        row, col = divmod(n, 6)
        expected = np.zeros((224, 224), bool)
        expected[row * 40:row * 40 + 40, col * 40:col * 40 + 40] = True   # numpy clips at 224 like PARE
        np.testing.assert_array_equal(masks[n], expected)
    assert masks[5].sum() == 40 * 24 and masks[35].sum() == 24 * 24


def test_dense_grid_uses_window_centres_as_anchors():
    table = load_protocol("occsens40-dense").windows("s", 224, 0)
    assert len(table["window"]) == 24 * 24
    assert (table["anchor_x"][:3] == [20, 28, 36]).all() and table["x0"][23] == 184


def test_geometry_at_320_is_scaled_and_drawn_at_input_size():
    protocol = load_protocol("advocc40")
    bank = occ.TextureBank(occ.skimage_source(), 320)
    table, masks = masks_of(protocol, 320, textures=bank)
    assert masks[0].sum() == 57 * 57 and masks[1][0, 14] and not masks[1][0, 13]
    # the 224 grid's last origin 190 px scaled on its own: round(190 * 320 / 224) = 271, clipped to 49 px wide
    assert masks[19].sum() == (320 - 271) * 57
    assert table["x0"][1] == pytest.approx(14 * 224 / 320)     # geometry columns stay in 224-crop px


def test_mean_fill_is_zero_after_imagenet_normalization():
    table = load_protocol("occsens40").windows("s", 224, 0)
    crops = torch.rand(36, 3, 224, 224)
    out = occ.compose(crops, table)
    mean = torch.tensor(occ.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    normalized = (out - mean) / std
    assert torch.allclose(normalized[7, :, 40:80, 40:80], torch.zeros(3, 40, 40), atol=1e-6)
    assert torch.equal(out[7, :, :40], crops[7, :, :40])          # outside the patch: untouched
    assert torch.equal(out[7, :, 80:], crops[7, :, 80:])


def test_visibility_test_is_strictly_inside_the_patch():
    table = load_protocol("occsens40").windows("s", 224, 0)
    one = {k: v[7:8] for k, v in table.items()}                    # patch [40, 80) x [40, 80)
    points = np.array([[[60, 60], [40, 60], [80, 60], [60, 40], [79.5, 79.5], [100, 100]]], dtype=float)
    assert occ.points_inside(one, points).tolist() == [[True, False, False, False, True, False]]


def test_texture_fill_is_the_drawn_texture_crop():
    bank = occ.TextureBank(occ.skimage_source(), 224)
    assert (np.minimum(bank.sizes[:, 0], bank.sizes[:, 1]) == 224).all()   # short side = crop size
    protocol = load_protocol("advocc80")
    table = protocol.windows("img7", 224, 3, textures=bank)
    assert len(set(table["texture"])) > 5                           # a fresh draw per window
    n = 17
    row, col = divmod(n, 16)
    crops = torch.zeros(1, 3, 224, 224)
    out = occ.compose(crops, {k: v[n:n + 1] for k, v in table.items()}, bank)
    texture = bank.get(int(table["texture"][n]))
    tx, ty = int(table["tex_x"][n]), int(table["tex_y"][n])
    expected = torch.from_numpy(texture[ty:ty + 80, tx:tx + 80]).permute(2, 0, 1).float() / 255
    assert torch.allclose(out[0, :, row * 10:row * 10 + 80, col * 10:col * 10 + 80], expected)
    assert 0 <= tx <= bank.sizes[table["texture"][n], 1] - 80


def test_every_draw_is_a_function_of_seed_sample_and_window():
    key = windows.sample_key("fp", 0, "a")
    all_windows = windows.uniforms(key, np.arange(400), 1)
    assert np.array_equal(windows.uniforms(key, np.array([123, 7]), 1), all_windows[[123, 7]])
    assert not np.array_equal(all_windows, windows.uniforms(windows.sample_key("fp", 1, "a"), np.arange(400), 1))
    assert not np.array_equal(all_windows, windows.uniforms(key, np.arange(400), 2))
    assert 0.45 < all_windows.mean() < 0.55 and all_windows.min() >= 0 and all_windows.max() < 1
    bank = occ.TextureBank(occ.skimage_source(), 224)
    p = load_protocol("advocc40")
    first, again = p.windows("a", 224, 5, textures=bank), p.windows("a", 224, 5, textures=bank)
    assert all(np.array_equal(first[k], again[k]) for k in ("texture", "tex_x", "tex_y"))
    only = p.windows("a", 224, 5, textures=bank, only=[399, 3])
    assert list(only["window"]) == [3, 399] and only["tex_x"][1] == first["tex_x"][399]


@pytest.mark.parametrize("doc", [1, 3, 5])
def test_degree_of_occlusion_sizes(doc):
    joints2d = np.full((14, 2), 112.0)
    circle, masks = masks_of(load_protocol(f"circle-doc{doc}"), joints2d=joints2d)
    radius = 10 * doc
    assert circle["occ_hw"][0] == radius
    assert abs(masks[0].sum() - math.pi * radius ** 2) < 0.05 * math.pi * radius ** 2
    rect, masks = masks_of(load_protocol(f"rect-doc{doc}"), joints2d=joints2d)
    area = 3000 * doc
    assert np.allclose(4 * rect["occ_hw"] * rect["occ_hh"], area)
    assert abs(masks[0].sum() - area) < 0.03 * area
    bar = load_protocol(f"bar-doc{doc}").replace(bar_angle=[0.0, 0.0])
    table, masks = masks_of(bar, joints2d=joints2d)
    assert table["occ_hh"][0] * 2 == 10 * doc
    assert masks[0].sum() == 224 * 10 * doc                       # a horizontal bar across the crop


def test_bar_orientation_is_random_and_rect_aspect_in_range():
    joints2d = np.random.default_rng(0).uniform(30, 190, (14, 2))
    bar = load_protocol("bar-doc2").windows("s", 224, 0, joints2d=joints2d)
    assert len(set(np.round(bar["occ_angle"], 6))) == 14 and (bar["occ_angle"] < math.pi).all()
    rect = load_protocol("rect-doc2").windows("s", 224, 0, joints2d=joints2d)
    aspect = rect["occ_hw"] / rect["occ_hh"]
    assert (aspect >= 0.5 - 1e-9).all() and (aspect <= 2 + 1e-9).all() and aspect.std() > 0


def test_hkmr_geometry_scales_with_input_size():
    joints2d = np.full((14, 2), 112.0)
    table = load_protocol("circle-doc4").windows("s", 320, 0, joints2d=joints2d)
    assert table["occ_hw"][0] == 57 and table["occ_cx"][0] == pytest.approx(160.0)


def test_voc_objects_from_a_voc_folder(tmp_path):
    fake_voc(tmp_path / "VOC2012")
    voc = VocOccluders.open(tmp_path)
    assert len(voc.objects) == 1 and voc.objects[0].shape == (25, 25, 4)      # stored at 0.5x
    alpha = voc.objects[0][..., 3]
    assert alpha[12, 12] == 255 and alpha[0, 0] == 0
    assert ((alpha > 0) & (alpha < 255)).sum() > 20                   # eroded border is semi-transparent
    protocol = load_protocol("voc-objects")
    draws = voc.draws(protocol, "s", 0, 0, 224)
    assert 1 <= len(draws) <= 7 and draws == voc.draws(protocol, "s", 0, 0, 224)
    counts = {len(voc.draws(protocol, f"s{i}", 0, 0, 224)) for i in range(60)}
    assert counts == set(range(1, 8))
    table = protocol.windows("s", 224, 0)
    assert list(table["window"]) == list(range(protocol.copies))
    out = protocol.compose(torch.zeros(1, 3, 224, 224), windows.select(table, [0]), ["s"], 0, objects=voc)
    assert out.sum() > 0

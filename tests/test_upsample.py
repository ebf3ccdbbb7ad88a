"""Activation maps at image resolution (`kernels.upsample`, `query.maps`): against `F.interpolate` where the two
conventions meet, against each position's receptive-field centre everywhere, and through the crop to the
original image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actindex.indexer.images import crop_geometry
from actindex.kernels.upsample import feature_coordinates, sample_maps, upsample_to_input
from actindex.query.maps import UnitMaps


@pytest.mark.parametrize(("height", "width", "stride"), [(7, 7, 32), (4, 6, 8), (1, 5, 4), (3, 1, 16)])
def test_a_field_as_wide_as_its_stride_equals_interpolate(height: int, width: int, stride: int) -> None:
    maps = torch.randn(3, height, width)
    ours = upsample_to_input(maps, ((stride, stride, 0), (stride, stride, 0)), 0)  # empty input: shapes only
    assert ours.shape == (3, 0, 0)
    pixels_h, pixels_w = height * stride, width * stride
    pixels_y = torch.arange(pixels_h, dtype=torch.float64)
    pixels_x = torch.arange(pixels_w, dtype=torch.float64)
    ours = sample_maps(maps, feature_coordinates(pixels_y, stride, stride, 0),
                       feature_coordinates(pixels_x, stride, stride, 0))
    reference = F.interpolate(maps[None].double(), size=(pixels_h, pixels_w), mode="bilinear",
                              align_corners=False)[0]
    torch.testing.assert_close(ours, reference.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("size", "stride", "padding"), [(35, 8, 13), (11, 4, 3), (99, 16, 41), (3, 1, 1)])
def test_each_positions_field_centre_carries_its_value(size: int, stride: int, padding: int) -> None:
    n = 6
    input_size = (n - 1) * stride - padding + size  # the last field ends at the input's edge
    maps = torch.randn(2, n, n)
    at_input = upsample_to_input(maps, ((size, stride, padding), (size, stride, padding)), input_size)
    assert at_input.shape == (2, input_size, input_size)
    for y in range(n):
        centre = y * stride - padding + size / 2  # continuous; the pixel u whose centre is there: u = centre - 0.5
        u = centre - 0.5
        if u != int(u) or not 0 <= u < input_size:
            continue
        for x in range(n):
            v = x * stride - padding + size / 2 - 0.5
            if v == int(v) and 0 <= v < input_size:
                torch.testing.assert_close(at_input[:, int(u), int(v)], maps[:, y, x])
    # between two centres, the value is the linear mix of the two
    assert float(at_input.min()) >= float(maps.min()) - 1e-6 and float(at_input.max()) <= float(maps.max()) + 1e-6


def test_a_map_without_extent_is_flat() -> None:
    maps = torch.tensor([[[2.5]]])
    flat = upsample_to_input(maps, ((224, 1, 0), (224, 1, 0)), 224)
    assert torch.equal(flat, torch.full((1, 224, 224), 2.5))


def test_the_original_image_sees_the_input_map_through_the_crop() -> None:
    geometry = crop_geometry(300, 200, 32)  # landscape: resized 48 x 36 ... cropped to 32 x 32
    rng = np.random.default_rng(0)
    maps = UnitMaps(rng.normal(size=(1, 4, 4)).astype(np.float32), ((8, 8, 0), (8, 8, 0)), 32, level=0.3)
    original = maps.at_original(0, geometry)
    assert original.shape == (200, 300)
    ys, xs = geometry.input_coordinates()
    inside_y, inside_x = ~torch.isnan(ys).numpy(), ~torch.isnan(xs).numpy()
    assert np.isnan(original[~inside_y]).all() and np.isnan(original[:, ~inside_x]).all()
    assert not np.isnan(original[inside_y][:, inside_x]).any()
    # the crop covers 32 of the 37 x 55 resized pixels: that share of the original's rows and columns
    assert abs(inside_y.sum() - 32 * 200 / geometry.resized_height) <= 1
    assert abs(inside_x.sum() - 32 * 300 / geometry.resized_width) <= 1
    # an affine map is reproduced exactly by bilinear sampling: check every pixel against the formula
    affine = UnitMaps((0.7 * np.arange(4)[:, None] - 0.2 * np.arange(4)[None, :] + 1)[None].astype(np.float32),
                      ((8, 8, 0), (8, 8, 0)), 32, level=None)
    exact = affine.at_original(0, geometry)
    rows, columns = np.arange(200) + 0.5, np.arange(300) + 0.5
    u = rows * geometry.resized_height / 200 - geometry.offset_y - 0.5  # input-pixel coordinate of each centre
    v = columns * geometry.resized_width / 300 - geometry.offset_x - 0.5
    ty, tx = np.clip((u + 0.5 - 4) / 8, 0, 3), np.clip((v + 0.5 - 4) / 8, 0, 3)
    expected = 0.7 * ty[:, None] - 0.2 * tx[None, :] + 1
    np.testing.assert_allclose(exact[inside_y][:, inside_x], expected[inside_y][:, inside_x], atol=1e-5)
    # and a smaller grid over the original samples the same map
    small = maps.at_original(0, geometry, 20, 30)
    assert small.shape == (20, 30) and np.isnan(small).any()


def test_masks_mark_where_the_map_reaches_the_level() -> None:
    values = np.array([[[0.1, 0.5], [0.31, np.nan]]], dtype=np.float32)
    maps = UnitMaps(values, ((1, 1, 0), (1, 1, 0)), 2, level=0.31)
    mask = maps.masks(values)
    assert mask is not None
    assert mask.tolist() == [[[False, True], [True, False]]]
    assert UnitMaps(values, ((1, 1, 0), (1, 1, 0)), 2, level=None).masks(values) is None

"""The PNG pictures: labels in any Latin script, titles that fit, a box that shows on any image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actindex.indexer.images import crop_geometry, preprocess
from actindex.query.attribution import Method
from actindex.query.loading import LoadedImage
from actindex.query.maps import UnitMaps
from actindex.query.neuron import Hit, NeuronResult
from actindex.query.render import GAP, TILE, context_tile, font, neuron_sheet

SIZE = 32


def result_for(pictures: list[Image.Image], boxes: list[tuple[int, int, int, int]],
               name: str = "café.jpg") -> NeuronResult:
    """A neuron query's result for these pictures, each hit's box given in original-image pixels."""
    hits, images = [], []
    for rank, (picture, box) in enumerate(zip(pictures, boxes, strict=True)):
        geometry = crop_geometry(picture.width, picture.height, SIZE)
        images.append(LoadedImage(name, preprocess(picture, SIZE), geometry, picture))
        hits.append(Hit(rank, rank, name, 1.0, 1.0, 0, 0, (0, 0, SIZE, SIZE), box,
                        (picture.height, picture.width)))
    maps = np.zeros((len(pictures), 3, SIZE, SIZE), dtype=np.float32)
    activation = UnitMaps(np.ones((len(pictures), 2, 2), dtype=np.float32), ((16, 16, 0), (16, 16, 0)), SIZE, 0.5)
    return NeuronResult(Path("i.h5"), "layer_with_a_long_name.features.3", 7, 512, SIZE, (SIZE, SIZE), hits,
                        images, {Method.GUIDED: maps, Method.GRADIENT: maps}, activation)


def test_labels_draw_latin_1_and_beyond_from_a_packaged_font() -> None:
    face = font(10)
    assert "site-packages" in str(face.path) or "dist-packages" in str(face.path)
    missing = face.getmask("\u0378")  # unassigned: the font's "missing glyph" box
    for char in "éèêëàçñßøåÆŒœŁžΩжЯ":
        mask = face.getmask(char)
        assert (mask.size, bytes(mask)) != (missing.size, bytes(missing)), char
    assert face.getbbox("é")[1] < face.getbbox("e")[1]  # the accent sits above the letter


@pytest.mark.parametrize("hits", [1, 2])
def test_titles_wrap_to_narrow_sheets(hits: int) -> None:
    picture = Image.new("RGB", (40, 30), (90, 140, 200))
    sheet = np.asarray(neuron_sheet(result_for([picture] * hits, [(0, 0, 30, 40)] * hits), context=True))
    header = sheet[:40]
    assert (header[:, -GAP:] == 255).all(), "the title runs off the sheet"
    ink_rows = np.flatnonzero((header < 128).any(axis=(1, 2)))
    assert ink_rows.max() > 20  # on more than one line


@pytest.mark.parametrize("colour", [(230, 30, 30), (255, 255, 255), (0, 0, 0), (128, 128, 128), (20, 120, 255)])
def test_the_box_shows_on_any_colour(colour: tuple[int, int, int]) -> None:
    picture = Image.new("RGB", (200, 100), colour)
    tile = np.asarray(context_tile(result_for([picture], [(20, 50, 80, 150)]), 0)).astype(int)
    # the tile shows the picture at 128/200 px per pixel, 32 px from the top: the box's top edge is at y 44.8
    edge = tile[43:48, 40:90].reshape(-1, 3)
    assert (edge.max(axis=1) < 40).any() and (edge.min(axis=1) > 215).any(), "needs a dark and a light line"
    inside = tile[60, 60]
    assert tuple(inside) == colour  # the box is drawn around the patch, not over it


def test_a_small_image_keeps_its_pixels_under_the_box() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    tile = np.asarray(context_tile(result_for([picture], [(0, 0, 8, 8)]), 0))
    assert tile.shape == (TILE, TILE, 3)
    enlarged = np.repeat(np.repeat(pixels, TILE // 8, axis=0), TILE // 8, axis=1)
    assert (tile == enlarged).all(axis=2).mean() > 0.9  # the box covers a thin border, not the picture

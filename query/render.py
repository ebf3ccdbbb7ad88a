"""Pictures a person can read at a glance: a unit's patches, its guided-backprop and gradient crops, scores
and image names, in one PNG.

Maps are shown per hit scaled symmetrically around zero (mid-grey is 0, colour is the sign per RGB channel),
over the hit's receptive-field box only, full scale at the 99.5th percentile of magnitudes, so each crop uses
the full range. Photos are cut from the original
image at its own resolution whenever that has more pixels than the network input's crop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from .neuron import NeuronResult
    from .similar import SimilarResult

TILE = 128
GAP = 6
LABEL = 30  # px of text under each column
BACKGROUND = (255, 255, 255)
BOX_COLOUR = (230, 30, 30)


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def fit(image: Image.Image, size: int = TILE) -> Image.Image:
    """Scale to fit a size x size square (nearest when enlarging, so pixels stay honest), centred on white."""
    scale = size / max(image.width, image.height)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    tile = Image.new("RGB", (size, size), BACKGROUND)
    tile.paste(image.resize(target, resample), ((size - target[0]) // 2, (size - target[1]) // 2))
    return tile


def map_image(values: np.ndarray, percentile: float = 99.5) -> Image.Image:
    """(3, h, w) signed map -> RGB picture, 0 at mid-grey, full scale at the `percentile` of its magnitudes
    (a few extreme pixels would otherwise leave the rest of the map flat grey)."""
    magnitude = np.abs(values)
    peak = float(np.percentile(magnitude, percentile)) or float(magnitude.max())
    scaled = values / peak if peak > 0 else np.zeros_like(values)
    pixels = np.clip(np.round(128 + 127 * scaled), 0, 255).astype(np.uint8)  # (3, h, w)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))


def patch_image(result: NeuronResult, rank: int) -> Image.Image:
    """The hit's receptive-field patch, from the original image when that is sharper."""
    hit, image = result.hits[rank], result.images[rank]
    y0, x0, y1, x1 = hit.box
    oy0, ox0, oy1, ox1 = hit.box_original
    if (oy1 - oy0) * (ox1 - ox0) > (y1 - y0) * (x1 - x0):
        return image.original.crop((ox0, oy0, ox1, oy1))
    return Image.fromarray(image.pixels[:, y0:y1, x0:x1].permute(1, 2, 0).numpy())


def context_image(result: NeuronResult, rank: int) -> Image.Image:
    """The whole original image with the patch's box drawn."""
    hit, image = result.hits[rank], result.images[rank]
    picture = image.original.copy()
    oy0, ox0, oy1, ox1 = hit.box_original
    width = max(1, round(max(picture.size) / TILE))  # about one displayed pixel after fitting
    ImageDraw.Draw(picture).rectangle((ox0, oy0, ox1 - 1, oy1 - 1), outline=BOX_COLOUR, width=width)
    return picture


def neuron_sheet(result: NeuronResult, context: bool = False, columns: int = 9) -> Image.Image:
    """A grid with one column per hit: patch, guided backprop, gradient (and the whole image with its box)."""
    rows = ["patch", "guided backprop", "gradient"] + (["image"] if context else [])
    n = len(result.hits)
    columns = min(columns, n)
    blocks = -(-n // columns)
    header = 24
    row_label = 0
    cell_h = len(rows) * (TILE + GAP) + LABEL
    width = row_label + columns * (TILE + GAP) + GAP
    height = header + blocks * cell_h + GAP
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    draw.text((GAP, 5), f"{result.layer} unit {result.unit} of {result.channels}: top {n} images "
                        f"(receptive field {result.rf_size[0]}x{result.rf_size[1]} px); rows: {', '.join(rows)}",
              fill=(0, 0, 0), font=font)
    small = _font(10)
    for rank, hit in enumerate(result.hits):
        block, column = divmod(rank, columns)
        left = GAP + column * (TILE + GAP)
        top = header + block * cell_h
        y0, x0, y1, x1 = hit.box
        tiles = [patch_image(result, rank), map_image(result.guided[rank][:, y0:y1, x0:x1]),
                 map_image(result.gradient[rank][:, y0:y1, x0:x1])]
        if context:
            tiles.append(context_image(result, rank))
        for row, tile in enumerate(tiles):
            sheet.paste(fit(tile), (left, top + row * (TILE + GAP)))
        text_top = top + len(rows) * (TILE + GAP) - 2
        draw.text((left, text_top), f"#{rank + 1}  {hit.score:.3g}", fill=(0, 0, 0), font=small)
        draw.text((left, text_top + 13), _shorten(hit.path, 22), fill=(60, 60, 60), font=small)
    return sheet


def _shorten(text: str, limit: int) -> str:
    name = text.rsplit("/", 1)[-1]
    return name if len(name) <= limit else name[: limit - 1] + "…"


def save_png(image: Image.Image, path: Path) -> None:
    """Write under a temporary name in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG", optimize=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def similar_sheet(result: SimilarResult, columns: int = 10) -> Image.Image:
    """The query, then its nearest images with scores; with an explanation, each hit's guided-backprop map of
    its similarity and the units contributing most under it."""
    if result.query_image is None or len(result.images) != len(result.hits):
        raise ValueError("the result holds no pictures: call find_similar with pictures=True")
    explained = result.maps is not None
    n = len(result.hits) + 1  # the query takes the first cell
    columns = min(columns, n)
    blocks = -(-n // columns)
    rows = 2 if explained else 1
    label = LABEL + (14 if explained else 0)
    cell_h = rows * (TILE + GAP) + label
    header = 24
    sheet = Image.new("RGB", (GAP + columns * (TILE + GAP), header + blocks * cell_h + GAP), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, 5), f"nearest images by cosine similarity of '{result.layer}' activations"
                        + ("; row 2: guided backprop of each score, units contributing most" if explained else ""),
              fill=(0, 0, 0), font=_font(12))
    small = _font(10)
    cells: list[tuple[Image.Image, Image.Image | None, str, str, str]] = [
        (result.query_image, None, "query", _shorten(str(result.query.get("path", result.query.get("image"))), 22),
         "")]
    for rank, hit in enumerate(result.hits):
        explanation = map_image(result.maps[rank]) if result.maps is not None else None
        units = " ".join(f"u{u}" for u, _ in hit.units[:3])
        cells.append((result.images[rank].original, explanation, f"#{rank + 1}  {hit.score:.3f}",
                      _shorten(hit.path, 22), units))
    for position, (picture, explanation, first, second, third) in enumerate(cells):
        block, column = divmod(position, columns)
        left = GAP + column * (TILE + GAP)
        top = header + block * cell_h
        sheet.paste(fit(picture), (left, top))
        if explanation is not None:
            sheet.paste(fit(explanation), (left, top + TILE + GAP))
        text_top = top + rows * (TILE + GAP) - 2
        draw.text((left, text_top), first, fill=(0, 0, 0), font=small)
        draw.text((left, text_top + 13), second, fill=(60, 60, 60), font=small)
        if third:
            draw.text((left, text_top + 26), third, fill=(60, 60, 60), font=small)
    return sheet

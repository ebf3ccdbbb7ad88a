"""Pictures a person can read at a glance: a unit's patches, its guided-backprop and gradient crops, scores
and image names, in one PNG.

Maps are shown per hit scaled symmetrically around zero (mid-grey is 0, colour is the sign per RGB channel),
over the hit's receptive-field box only, full scale at the 99.5th percentile of magnitudes, so each crop uses
the full range. Photos are cut from the original
image at its own resolution whenever that has more pixels than the network input's crop.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from actindex.indexer.atomic import atomic_path

if TYPE_CHECKING:
    from .attribution import Method
    from .loading import LoadedImage
    from .maps import UnitMaps
    from .neuron import NeuronResult
    from .patches import PatchResult
    from .similar import SimilarResult

TILE = 128
GAP = 6
LABEL = 30  # px of text under each column
BACKGROUND = (255, 255, 255)
INK, GREY = (0, 0, 0), (60, 60, 60)


@functools.cache
def font(size: int = 11) -> ImageFont.FreeTypeFont:
    """Noto Sans, shipped by the fontpkg-noto-sans package: Latin (all of Latin-1 and beyond), Greek and Cyrillic,
    so file names such as 'café.jpg' are drawn as written (Pillow's built-in font has ASCII only)."""
    import fontpkg

    return ImageFont.truetype(str(fontpkg.path("Noto Sans")), size)


def fit_text(text: str, face: ImageFont.FreeTypeFont, width: float) -> str:
    """`text`, cut at the end with '…' until it is at most `width` pixels wide."""
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def wrap_text(text: str, face: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """Lines of at most `width` pixels, broken between words (a word wider than a line is cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(fit_text(word, face, width))
    return lines or [""]


def draw_title(draw: ImageDraw.ImageDraw, text: str, width: int) -> None:
    """The sheet's title, wrapped to its width (`title_height` says how much room it takes)."""
    face = font(12)
    for line_number, line in enumerate(wrap_text(text, face, width - 2 * GAP)):
        draw.text((GAP, 5 + 16 * line_number), line, fill=INK, font=face)


def title_height(text: str, width: int) -> int:
    return 8 + 16 * len(wrap_text(text, font(12), width - 2 * GAP))


def _placement(image: Image.Image, size: int) -> tuple[tuple[int, int], tuple[int, int], float]:
    """Where `fit` puts `image` in its square: (width, height), (left, top), scale."""
    scale = size / max(image.width, image.height)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return target, ((size - target[0]) // 2, (size - target[1]) // 2), scale


def fit(image: Image.Image, size: int = TILE) -> Image.Image:
    """Scale to fit a size x size square (nearest when enlarging, so pixels stay honest), centred on white."""
    target, corner, scale = _placement(image, size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    tile = Image.new("RGB", (size, size), BACKGROUND)
    tile.paste(image.resize(target, resample), corner)
    return tile


def draw_box(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float]) -> None:
    """A box (x0, y0, x1, y1), edges in pixels, drawn as a white line between two black ones: it shows on any
    colour, red subjects included, and stays three screen pixels wide whatever the picture's size."""
    x0, y0, x1, y1 = (round(v) for v in box)
    draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=INK, width=3)
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BACKGROUND, width=1)


def method_label(result: NeuronResult, method: Method) -> str:
    """A map row's name, with the Grad-CAM layer, and '(!)' when the sanity check flagged the method."""
    label = f"{method.label} of {result.cam_layer}" if method.value == "grad-cam" else method.label
    if result.sanity is not None and method in result.sanity.flagged:
        label += " (!)"
    return label


def map_image(values: np.ndarray, percentile: float = 99.5) -> Image.Image:
    """(3, h, w) signed map -> RGB picture, 0 at mid-grey, full scale at the `percentile` of its magnitudes
    (a few extreme pixels would otherwise leave the rest of the map flat grey); a (1, h, w) map is grey."""
    if values.shape[0] == 1:
        values = np.repeat(values, 3, axis=0)
    magnitude = np.abs(values)
    peak = float(np.percentile(magnitude, percentile)) or float(magnitude.max())
    scaled = values / peak if peak > 0 else np.zeros_like(values)
    pixels = np.clip(np.round(128 + 127 * scaled), 0, 255).astype(np.uint8)  # (3, h, w)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))


def patch(image: LoadedImage, box: tuple[int, int, int, int]) -> Image.Image:
    """The receptive-field patch `box` (network-input pixels), cut from the original image when that has more
    pixels than the input's crop."""
    y0, x0, y1, x1 = box
    oy0, ox0, oy1, ox1 = image.geometry.to_original(box)
    if (oy1 - oy0) * (ox1 - ox0) > (y1 - y0) * (x1 - x0):
        return image.original.crop((ox0, oy0, ox1, oy1))
    return Image.fromarray(image.pixels[:, y0:y1, x0:x1].permute(1, 2, 0).numpy())


def context_tile(result: NeuronResult, rank: int, size: int = TILE) -> Image.Image:
    """The whole original image fitted to a tile, with the patch's box drawn at the tile's resolution (so it
    covers as little of a small image as of a large one)."""
    return boxed_tile(result.images[rank].original, result.hits[rank].box_original, size)


def boxed_tile(original: Image.Image, box: tuple[int, int, int, int], size: int = TILE) -> Image.Image:
    """An original image fitted to a tile with `box` (y0, x0, y1, x1, original pixels) drawn on it."""
    tile = fit(original, size)
    _, (left, top), scale = _placement(original, size)
    oy0, ox0, oy1, ox1 = box
    draw_box(ImageDraw.Draw(tile), (left + ox0 * scale, top + oy0 * scale, left + ox1 * scale, top + oy1 * scale))
    return tile


# A perceptually ordered ramp, dark to light (close to matplotlib's "inferno"), for activation overlays.
HEAT_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
FADED = 235  # grey the masked-out region and the area the network never saw fade to


OUTLINE = (255, 200, 0)


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a (h, w) boolean mask next to a pixel outside it (its border, inside the region)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape -> RGB float64 (..., 3) on `HEAT_STOPS`."""
    position = np.clip(values, 0, 1) * (len(HEAT_STOPS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(HEAT_STOPS) - 2)
    weight = (position - low)[..., None]
    return HEAT_STOPS[low] * (1 - weight) + HEAT_STOPS[low + 1] * weight


def activation_pictures(maps: UnitMaps, rank: int, image: LoadedImage, best: float,
                        size: int = TILE) -> tuple[Image.Image, Image.Image | None]:
    """Hit `rank`'s whole original image, its longest side `size` pixels: (overlay, mask). The overlay shows the
    unit's map in colour (0 dark, `best` light, the photo showing through where the unit is silent; a negative
    `best` draws how far below 0 the map goes); the mask
    keeps the image where the map reaches the unit's p99 level, outlined (None for indexes without
    distributions). What the network input did not cover is faded in both."""
    (width, height), _, _ = _placement(image.original, size)
    activation = maps.at_original(rank, image.geometry, height, width)  # (height, width), NaN outside the crop
    photo = np.asarray(image.original.convert("RGB").resize((width, height), Image.Resampling.LANCZOS),
                       dtype=np.float64)
    seen = ~np.isnan(activation)[..., None]
    faded = 0.3 * photo + 0.7 * FADED
    strength = np.clip(np.nan_to_num(activation) / best if best else np.zeros_like(activation), 0, 1)[..., None]
    alpha = 0.25 + 0.65 * strength  # the photo stays readable where the unit is silent
    overlay = np.where(seen, (1 - alpha) * photo + alpha * heat(strength[..., 0]), faded)
    mask = maps.masks(activation)
    if mask is None:
        return picture(overlay), None
    outlined = np.where(seen & mask[..., None], photo, faded)
    outlined[outline(mask)] = OUTLINE  # a region of a few pixels still shows
    return picture(overlay), picture(outlined)


def picture(rgb: np.ndarray) -> Image.Image:
    """(h, w, 3) float RGB in [0, 255] -> image."""
    return Image.fromarray(np.round(np.clip(rgb, 0, 255)).astype(np.uint8))


def activation_tiles(result: NeuronResult, rank: int, size: int = TILE) -> tuple[Image.Image, Image.Image | None]:
    """`activation_pictures` of a neuron query's hit, each centred on a size x size tile; the colour scale ends at
    the unit's best score (for the lowest hits, at their lowest)."""
    best = min(result.hits[0].score, float(np.nanmin(result.maps.maps))) if result.lowest else \
        max(result.hits[0].score, float(np.nanmax(result.maps.maps)))
    overlay, mask = activation_pictures(result.maps, rank, result.images[rank], best, size)
    _, corner, _ = _placement(result.images[rank].original, size)

    def on_tile(image: Image.Image) -> Image.Image:
        tile = Image.new("RGB", (size, size), BACKGROUND)
        tile.paste(image, corner)
        return tile

    return on_tile(overlay), None if mask is None else on_tile(mask)


def neuron_sheet(result: NeuronResult, context: bool = False, columns: int = 9) -> Image.Image:
    """A grid with one column per hit: patch, guided backprop, gradient, the unit's map over the whole image and
    the region above its p99 level (and the whole image with the patch's box)."""
    masked = result.maps.level is not None
    methods = list(result.attributions)
    rows = (["patch"] + [method_label(result, m) for m in methods] + ["activation map"]
            + (["above p99"] if masked else []) + (["image"] if context else []))
    n = len(result.hits)
    columns = min(columns, n)
    blocks = -(-n // columns)
    cell_h = len(rows) * (TILE + GAP) + LABEL
    width = columns * (TILE + GAP) + GAP
    which = "lowest" if result.lowest else "top"
    title = (f"{result.layer} unit {result.unit} of {result.channels}: {which} {n} images (receptive field "
             f"{result.rf_size[0]}x{result.rf_size[1]} px); rows: {', '.join(rows)}")
    if masked:
        title += f" (p99 = {result.maps.level:.4g} over the dataset)"
    if result.sanity is not None:
        title += (f". Sanity check, rank correlation with these maps once the unit's block is random, then once "
                  f"all weights up to the unit are ({len(result.sanity.steps)} steps): "
                  + "; ".join(f"{m.label} {result.sanity.spearman[m][0]:.2f}, {result.sanity.spearman[m][-1]:.2f}"
                              for m in methods) + ". (!) marks maps that barely change: they show the image more "
                  "than the unit")
    header = title_height(title, width)
    sheet = Image.new("RGB", (width, header + blocks * cell_h + GAP), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw_title(draw, title, width)
    small = font(10)
    for rank, hit in enumerate(result.hits):
        block, column = divmod(rank, columns)
        left = GAP + column * (TILE + GAP)
        top = header + block * cell_h
        y0, x0, y1, x1 = hit.box
        overlay, mask = activation_tiles(result, rank)
        tiles = ([fit(patch(result.images[rank], hit.box))]
                 + [fit(map_image(result.attributions[m][rank][:, y0:y1, x0:x1])) for m in methods]
                 + [overlay] + ([mask] if mask else []))
        if context:
            tiles.append(context_tile(result, rank))
        for row, tile in enumerate(tiles):
            sheet.paste(tile, (left, top + row * (TILE + GAP)))
        text_top = top + len(rows) * (TILE + GAP) - 2
        draw.text((left, text_top), f"#{rank + 1}  {hit.score:.3g}", fill=INK, font=small)
        draw.text((left, text_top + 13), fit_text(_name(hit.path), small, TILE), fill=GREY, font=small)
    return sheet


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def save_png(image: Image.Image, path: Path) -> None:
    """Write under a temporary name in the same folder, then rename: a reader never sees half a file."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)


Cell = tuple[Image.Image, Image.Image | None, str, str, str]  # picture, its map (row 2) or None, three lines of text


def result_grid(title: str, cells: list[Cell], explained: bool, columns: int = 10) -> Image.Image:
    """A query and its hits as a grid of tiles under a title: each cell a picture, with `explained` a second row
    for its map, and three lines of text (the first in ink, the others grey)."""
    columns = min(columns, len(cells))
    blocks = -(-len(cells) // columns)
    rows = 2 if explained else 1
    cell_h = rows * (TILE + GAP) + LABEL + (14 if explained else 0)
    width = GAP + columns * (TILE + GAP)
    header = title_height(title, width)
    sheet = Image.new("RGB", (width, header + blocks * cell_h + GAP), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw_title(draw, title, width)
    small = font(10)
    for position, (picture, explanation, first, second, third) in enumerate(cells):
        block, column = divmod(position, columns)
        left = GAP + column * (TILE + GAP)
        top = header + block * cell_h
        sheet.paste(picture if picture.size == (TILE, TILE) else fit(picture), (left, top))
        if explanation is not None:
            sheet.paste(fit(explanation), (left, top + TILE + GAP))
        text_top = top + rows * (TILE + GAP) - 2
        for line, (text, colour) in enumerate(((first, INK), (second, GREY), (third, GREY))):
            if text:
                draw.text((left, text_top + 13 * line), fit_text(text, small, TILE), fill=colour, font=small)
    return sheet


EXPLAINED = "; row 2: guided backprop of each score, units contributing most"


def similar_sheet(result: SimilarResult, columns: int = 10) -> Image.Image:
    """The query, then its nearest images with scores; with an explanation, each hit's guided-backprop map of
    its similarity and the units contributing most under it."""
    if result.query_image is None or len(result.images) != len(result.hits):
        raise ValueError("the result holds no pictures: call find_similar with pictures=True")
    explained = result.maps is not None
    title = f"nearest images by cosine similarity of '{result.layer}' activations" + (EXPLAINED if explained else "")
    cells: list[Cell] = [
        (result.query_image, None, "query", _name(str(result.query.get("path", result.query.get("image")))), "")]
    for rank, hit in enumerate(result.hits):
        explanation = map_image(result.maps[rank]) if result.maps is not None else None
        units = " ".join(f"u{u}" for u, _ in hit.units[:3])
        cells.append((result.images[rank].original, explanation, f"#{rank + 1}  {hit.score:.3f}", _name(hit.path),
                      units))
    return result_grid(title, cells, explained, columns)


def patch_sheet(result: PatchResult, columns: int = 10) -> Image.Image:
    """The query image with its box, then each hit's patch (its receptive field, cut from the original image) with
    its score, image and position; with an explanation, each hit's guided-backprop map of its score over the
    patch and the units contributing most."""
    explained = result.maps is not None
    title = (f"nearest patches by cosine similarity of '{result.layer}' vectors (at most {result.per_image} per "
             "image), each cut to its receptive field" + (EXPLAINED if explained else ""))
    query_name = _name(str(result.query.get("path", result.query.get("image"))))
    unit = f"unit {result.query['unit']}" if "unit" in result.query else ""
    cells: list[Cell] = [(boxed_tile(result.query_image.original, result.box_original), None, "query", query_name,
                          unit)]
    for rank, hit in enumerate(result.hits):
        explanation = None
        if result.maps is not None:
            y0, x0, y1, x1 = hit.box
            explanation = map_image(result.maps[rank][:, y0:y1, x0:x1])
        units = " ".join(f"u{u}" for u, _ in hit.units[:3])
        cells.append((patch(result.images[rank], hit.box), explanation, f"#{rank + 1}  {hit.score:.3f}",
                      _name(hit.path), units or f"at ({hit.y}, {hit.x})"))
    return result_grid(title, cells, explained, columns)

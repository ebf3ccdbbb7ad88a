"""Where else in the dataset does the network see something like this part of this image? Patch search over the
vectors of every feature position of the index's patch layer (built with --patch-layer; `/patches/<layer>` and
the FAISS file `INDEX.patches.faiss` beside it).

The query is a box on an image: a new image (`--image`), an indexed one (`--id`, its stored vectors), or a unit's
hit (`--from-unit L:U:R`, the box of its receptive field on the hit image). The query vector is the mean of the
layer's vectors at the positions whose receptive-field centres lie inside the box (on the network input); a box
that holds no centre along an axis takes the position whose centre is nearest to the box's centre on that axis.
A hit is one position of one image: its score is the cosine of its vector with the query vector; its patch is
the position's receptive field, in network-input and original pixels. At most `per_image` hits come from one
image (default 2), so that the neighbouring positions of one photo do not fill the page.

The explanation of a hit (`explain`) is guided backprop of its score, q̂ · v̂(x)[:, y, x] with q̂ fixed, with
respect to the hit image's normalized input, and the units with the largest terms q̂_i · v̂_i (they sum to the
score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from actindex.indexer.index_file import LayerGrid
from actindex.indexer.similarity import SimilarityIndex, normalize
from actindex.kernels.errors import UserError

from .similar import explain_cosines, normalized, read_query, running

if TYPE_CHECKING:
    from torch import nn

    from .index import Index
    from .loading import LoadedImage

PER_IMAGE = 2  # hits per image, by default
Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), half-open


@dataclass(frozen=True)
class PatchHit:
    rank: int
    image_id: int
    path: str
    y: int  # feature position in the patch layer's map
    x: int
    score: float  # cosine similarity of the position's vector to the query vector
    box: Box  # the position's receptive field on the network input, clipped
    box_original: Box  # the same on the original image (the smallest box covering it)
    units: tuple[tuple[int, float], ...] = ()  # (unit, q̂_i·v̂_i), largest first, with explain


@dataclass
class PatchResult:
    index: Path
    layer: str
    query: dict[str, object]  # {"id": N, "path": …} or {"image": path}; "unit": "L:U:R" for a unit's hit
    box: Box  # the query box on the network input (rounded outwards, clipped)
    box_original: Box  # the query box on the original image
    positions: list[tuple[int, int]]  # the feature positions whose mean is the query vector
    nearest: bool  # no receptive-field centre lay inside the box (along some axis): the nearest one was taken
    per_image: int
    hits: list[PatchHit]
    query_image: LoadedImage
    images: list[LoadedImage]  # the hits' images, as the build preprocessed them
    maps: np.ndarray | None = None  # (k, 3, S, S) guided backprop of each hit's score, with explain
    unguided: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"index": str(self.index), "layer": self.layer, "query": self.query, "box": list(self.box),
                "box_original": list(self.box_original), "positions": [list(p) for p in self.positions],
                "nearest_position": self.nearest, "per_image": self.per_image,
                "hits": [{"rank": h.rank, "image_id": h.image_id, "path": h.path, "y": h.y, "x": h.x,
                          "score": h.score, "box": list(h.box), "box_original": list(h.box_original),
                          "units": [{"unit": u, "contribution": c} for u, c in h.units]} for h in self.hits],
                "unguided_activations": self.unguided}


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'y0,x0,y1,x1' -> the box, with y1 > y0 and x1 > x0; a one-line error otherwise."""
    try:
        y0, x0, y1, x1 = (float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--box takes four numbers y0,x0,y1,x1 (original-image pixels), got '{text}'") from None
    if y1 <= y0 or x1 <= x0:
        raise UserError(f"--box {text} is empty: it needs y1 > y0 and x1 > x0")
    return y0, x0, y1, x1


@dataclass(frozen=True)
class UnitHit:
    """`--from-unit L:U:R`: unit U of layer L, its R-th best hit (1 is the best)."""

    layer: str
    unit: int
    rank: int

    @classmethod
    def parse(cls, text: str) -> UnitHit:
        parts = text.rsplit(":", 2)
        try:
            layer, unit, rank = parts[0], int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise UserError(f"--from-unit takes LAYER:UNIT:RANK (RANK 1 is the unit's best hit), got '{text}'") \
                from None
        if rank < 1:
            raise UserError(f"--from-unit {text}: RANK counts from 1 (the unit's best hit)")
        return cls(layer, unit, rank)

    def __str__(self) -> str:
        return f"{self.layer}:{self.unit}:{self.rank}"


def box_positions(grid: LayerGrid, box: tuple[float, float, float, float]) -> tuple[list[tuple[int, int]], bool]:
    """The positions whose receptive-field centres lie in `box` (network-input coordinates, continuous, half-open),
    row-major; along an axis without one, the position nearest to the box's centre. Returns (positions, nearest)."""
    centre_y, centre_x = grid.centres()
    y0, x0, y1, x1 = box
    nearest = False
    chosen = []
    for centres, low, high in ((centre_y, y0, y1), (centre_x, x0, x1)):
        inside = np.flatnonzero((centres >= low) & (centres < high))
        if not len(inside):
            inside = np.array([int(np.argmin(np.abs(centres - (low + high) / 2)))])
            nearest = True
        chosen.append(inside)
    return [(int(y), int(x)) for y in chosen[0] for x in chosen[1]], nearest


def image_vectors(opened: Index, grid: LayerGrid, image: LoadedImage, image_id: int | None) -> np.ndarray:
    """(H * W, C) float32: an indexed image's stored patch vectors, or a new image's computed by the network."""
    if image_id is not None:
        rows = opened.reader.patches(grid.layer)[image_id * grid.positions:(image_id + 1) * grid.positions]
        vectors = np.asarray(rows, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise UserError(f"image {image_id} ('{image.path}') could not be read at build time and has no patch "
                            "vectors; 'actindex info' lists why")
        return vectors
    import torch

    from actindex.indexer.taps import layer_value

    with running(opened.info, opened.device), torch.inference_mode():
        x = normalized(image, opened.info, opened.device)  # (1, 3, S, S)
        maps: torch.Tensor = layer_value(opened.loaded.module, grid.layer, x)  # (1, C, H, W)
    return maps[0].float().permute(1, 2, 0).reshape(grid.positions, grid.channels).cpu().numpy()  # (H*W, C)


def search_patches(opened: Index, image: Path | None = None, image_id: int | None = None,
                   box: tuple[float, float, float, float] | None = None, from_unit: UnitHit | None = None,
                   k: int = 9, per_image: int = PER_IMAGE, layer: str | None = None,
                   explain: bool = False) -> PatchResult:
    """`Index.patches`: the k patches nearest to a box of a new image, of an indexed one, or of a unit's hit."""
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    if per_image < 1:
        raise UserError(f"--per-image must be at least 1, got {per_image}")
    if sum(x is not None for x in (image, image_id, from_unit)) != 1:
        raise UserError("give one of --image PATH, --id N or --from-unit LAYER:UNIT:RANK")
    if from_unit is None and box is None:
        raise UserError("a patch search needs --box y0,x0,y1,x1 (original-image pixels) on the image")
    reader, info = opened.reader, opened.info
    grid = reader.patch_grid(layer or info.patch_layer)
    similarity = opened.similarity(grid.layer, patches=True)
    query: dict[str, object] = {}
    if from_unit is not None:
        image_id, input_box = _unit_hit(opened, from_unit)
        query["unit"] = str(from_unit)
    if image_id is not None:
        if not 0 <= image_id < info.num_images:
            raise UserError(f"--id {image_id} is out of range: the index has images 0-{info.num_images - 1}")
        query_image = opened.images([image_id])[0]
        query.update({"id": image_id, "path": query_image.path})
    else:
        assert image is not None
        query_image = read_query(image, info, opened.device)
        query["image"] = str(image)
    crop = query_image.geometry
    if from_unit is None:
        assert box is not None
        y0, x0, y1, x1 = box
        if y1 <= 0 or x1 <= 0 or y0 >= crop.height or x0 >= crop.width:
            raise UserError(f"--box {y0:g},{x0:g},{y1:g},{x1:g} lies outside the image ({crop.height} x {crop.width} "
                            "pixels, height x width)")
        input_box = crop.to_input(box)
    positions, nearest = box_positions(grid, input_box)
    vectors = image_vectors(opened, grid, query_image, image_id)  # (H*W, C)
    rows = [y * grid.width + x for y, x in positions]
    query_vector = vectors[rows].mean(axis=0, keepdims=True)  # (1, C)
    if not (query_vector != 0).any():
        raise UserError("the layer's vectors are zero at every position in the box (no unit responds there), so "
                        "there is no direction to compare with: choose another box")
    clipped = _round_out(input_box, info.input_size)
    found = nearest_patches(similarity, query_vector, k, per_image, grid)
    images = opened.images([hit_id for hit_id, *_ in found])
    hits = []
    for rank, ((hit_id, y, x, score), loaded) in enumerate(zip(found, images, strict=True)):
        y0, x0, y1, x1 = (int(v) for v in grid.boxes(np.array(y), np.array(x), info.input_size))
        hits.append(PatchHit(rank, hit_id, loaded.path, y, x, score, (y0, x0, y1, x1),
                             loaded.geometry.to_original((y0, x0, y1, x1))))
    result = PatchResult(opened.path, grid.layer, query, clipped, crop.to_original(clipped), positions, nearest,
                         per_image, hits, query_image, images)
    if explain and hits:
        with running(info, opened.device):
            _explain(result, opened.loaded.module, normalize(query_vector)[0], opened)
    return result


def find_patches(index: Path, image: Path | None = None, image_id: int | None = None,
                 box: tuple[float, float, float, float] | None = None, from_unit: UnitHit | None = None,
                 k: int = 9, per_image: int = PER_IMAGE, layer: str | None = None, data: Path | None = None,
                 weights: str | None = None, device: str = "cpu", explain: bool = False) -> PatchResult:
    """`actindex similar --box`/`--from-unit`: one patch search; for many, open the index once
    (`actindex.query.index.Index`) and ask its `patches`."""
    from .index import Index

    with Index(index, data=data, weights=weights, device=device) as opened:
        return search_patches(opened, image, image_id, box, from_unit, k, per_image, layer, explain)


def _unit_hit(opened: Index, hit: UnitHit) -> tuple[int, tuple[float, float, float, float]]:
    """The image id of a unit's hit and its receptive-field box on the network input."""
    table = opened.layer(hit.layer)
    if not 0 <= hit.unit < table.grid.channels:
        raise UserError(f"--from-unit {hit}: layer '{hit.layer}' has units 0-{table.grid.channels - 1}")
    if hit.rank > table.image.shape[1] or table.image[hit.unit, hit.rank - 1] < 0:
        kept = int((table.image[hit.unit] >= 0).sum())
        raise UserError(f"--from-unit {hit}: the index keeps {kept} hits of this unit (ranks 1-{kept})")
    y0, x0, y1, x1 = (float(v) for v in table.box[hit.unit, hit.rank - 1])
    return int(table.image[hit.unit, hit.rank - 1]), (y0, x0, y1, x1)


def _round_out(box: tuple[float, float, float, float], size: int) -> Box:
    y0, x0, y1, x1 = box
    return (min(max(int(np.floor(y0)), 0), size), min(max(int(np.floor(x0)), 0), size),
            min(max(int(np.ceil(y1)), 0), size), min(max(int(np.ceil(x1)), 0), size))


def nearest_patches(similarity: SimilarityIndex, query: np.ndarray, k: int, per_image: int, grid: LayerGrid,
                    exclude: int | None = None) -> list[tuple[int, int, int, float]]:
    """The best k (image, y, x, score) for the (1, C) `query`, at most `per_image` from one image and none from
    image `exclude`: asks the index for more results until k are kept or it has no more."""
    total = int(similarity.index.ntotal)
    fetch = min(total, 4 * k * per_image + (grid.positions if exclude is not None else 0))
    while True:
        scores, ids = similarity.search(query, fetch)
        valid = ids[0] >= 0
        images, ys, xs = grid.unravel(ids[0][valid])
        kept: list[tuple[int, int, int, float]] = []
        taken: dict[int, int] = {} if exclude is None else {exclude: per_image}
        for image, y, x, score in zip(images.tolist(), ys.tolist(), xs.tolist(), scores[0][valid].tolist(),
                                      strict=True):
            if taken.get(image, 0) < per_image:
                taken[image] = taken.get(image, 0) + 1
                kept.append((image, y, x, score))
                if len(kept) == k:
                    return kept
        if fetch >= total:
            return kept
        fetch = min(total, fetch * 4)


def strongest_positions(vectors: np.ndarray, grid: LayerGrid, count: int = 3) -> list[tuple[int, int]]:
    """An image's `count` positions with the longest vectors (L2; NaN as 0), each at least two positions (along y
    or x) from those chosen before it, so that they show different parts of the image; strongest first."""
    norms = np.linalg.norm(np.nan_to_num(np.asarray(vectors, dtype=np.float32)), axis=1)  # (H*W,)
    chosen: list[tuple[int, int]] = []
    for row in np.argsort(-norms, kind="stable"):
        if norms[row] <= 0 or len(chosen) == count:
            break
        y, x = divmod(int(row), grid.width)
        if all(max(abs(y - a), abs(x - b)) >= 2 for a, b in chosen):
            chosen.append((y, x))
    return chosen


def _explain(result: PatchResult, model: nn.Module, query: np.ndarray, opened: Index) -> None:
    """Guided backprop of q̂ · v̂(x)[:, y, x] for every hit at once, and the units with the largest terms."""
    import torch

    from actindex.indexer.taps import layer_value

    device = opened.device
    rows = torch.arange(len(result.hits), device=device)
    ys = torch.tensor([hit.y for hit in result.hits], device=device)
    xs = torch.tensor([hit.x for hit in result.hits], device=device)
    found = explain_cosines(model, normalized(result.images, opened.info, device), query, lambda x: layer_value(
        model, result.layer, x, lambda out: out[rows, :, ys, xs].float()))  # (k, C): each hit's position
    result.hits = [PatchHit(hit.rank, hit.image_id, hit.path, hit.y, hit.x, hit.score, hit.box, hit.box_original,
                            units) for hit, units in zip(result.hits, found.units, strict=True)]
    result.maps, result.unguided = found.maps, found.unguided

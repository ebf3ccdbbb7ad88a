"""What does unit U of layer L respond to? Its top images from the index, re-run to check them, and which
pixels of each drive it: guided backpropagation (Springenberg et al. 2015) and the plain gradient.

Conventions: maps are gradients of the unit's activation at its recorded feature position with respect to
the normalized network input, (3, S, S) per hit, in network-input pixels. Boxes are (y0, x0, y1, x1),
half-open, in network-input pixels (`box`) and in the original image's pixels (`box_original`).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actindex.indexer.atomic import atomic_path
from actindex.indexer.choices import Precision
from actindex.indexer.images import Normalize
from actindex.indexer.index_file import UnitClasses, UnitDistribution
from actindex.kernels.errors import UserError

from .attribution import DEFAULT, Method, Settings, attribute_methods
from .loading import LoadedImage, query_numerics
from .maps import UnitMaps
from .sanity import SanityResult, sanity_check
from .unit import profile_json

if TYPE_CHECKING:
    from .index import Index

@dataclass(frozen=True)
class Hit:
    rank: int  # 0 for the unit's best image
    image_id: int
    path: str
    score: float  # as recorded in the index
    recomputed: float
    y: int
    x: int
    box: tuple[int, int, int, int]  # network-input pixels
    box_original: tuple[int, int, int, int]  # original-image pixels
    image_size: tuple[int, int]  # original (height, width)


@dataclass
class NeuronResult:
    index: Path
    layer: str
    unit: int
    channels: int
    input_size: int
    rf_size: tuple[int, int]
    hits: list[Hit]
    images: list[LoadedImage]
    attributions: dict[Method, np.ndarray]  # per method asked, (n, 3 or 1, S, S) float32 in input pixels
    maps: UnitMaps  # where in each hit's image the unit fires
    unguided: dict[str, int] = field(default_factory=dict)
    distribution: UnitDistribution | None = None  # over the whole dataset; None for indexes from before it
    classes: UnitClasses | None = None  # per-class means; None without class folders
    lowest: bool = False  # the hits are the unit's lowest-scoring images (--bottom-k), lowest first
    sanity: SanityResult | None = None  # with --sanity: do the maps depend on the weights?
    cam_layer: str | None = None  # the layer grad-cam was taken from

    @property
    def guided(self) -> np.ndarray:
        return self.attributions[Method.GUIDED]

    @property
    def gradient(self) -> np.ndarray:
        return self.attributions[Method.GRADIENT]

    def to_json(self) -> dict[str, object]:
        return {"index": str(self.index), "layer": self.layer, "unit": self.unit, "channels": self.channels,
                "input_size": self.input_size, "receptive_field": list(self.rf_size),
                "hits": [{"rank": h.rank, "image_id": h.image_id, "path": h.path, "score": h.score,
                          "recomputed": h.recomputed, "position": [h.y, h.x], "box": list(h.box),
                          "box_original": list(h.box_original), "image_size": list(h.image_size)}
                         for h in self.hits],
                "lowest": self.lowest, "methods": [m.value for m in self.attributions],
                "cam_layer": self.cam_layer, "unguided_activations": self.unguided,
                "sanity": None if self.sanity is None else self.sanity.to_json(),
                **profile_json(self.distribution, self.classes)}


def query_neuron(index: Path, layer: str, unit: int, k: int | None = None, data: Path | None = None,
                 weights: str | None = None, device: str = "cpu", lowest: bool = False,
                 settings: Settings = DEFAULT, sanity: int = 0, seed: int = 0) -> NeuronResult:
    """The unit's top hits (or with `lowest`, its lowest: indexes built with --bottom-k) from the index at
    `index`, each re-run through the network and checked, with their maps; for many queries, open the index
    once (`actindex.query.index.Index`) and ask it."""
    from .index import Index

    with Index(index, data=data, weights=weights, device=device) as opened:
        return unit_hits(opened, layer, unit, k, lowest, settings, sanity, seed)


def unit_hits(opened: Index, layer: str, unit: int, k: int | None = None, lowest: bool = False,
              settings: Settings = DEFAULT, sanity: int = 0, seed: int = 0) -> NeuronResult:
    """`Index.neuron`: the unit's top (or lowest) hits, each re-run through the network and checked, with the
    maps of `settings.methods`; with `sanity` > 0, the cascading-randomization check in that many steps."""
    settings.check(layer)
    hits, info, device = opened.layer(layer, lowest), opened.info, opened.device
    if not 0 <= unit < hits.grid.channels:
        raise UserError(f"unit {unit} is out of range: layer '{layer}' has {hits.grid.channels} units "
                        f"(0-{hits.grid.channels - 1})")
    available = int((hits.image[unit] >= 0).sum())
    if available == 0:
        raise UserError(f"unit {unit} of layer '{layer}' has no hits in the index (no readable images)")
    count = available if k is None else min(k, available)
    if count < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    ids = [int(i) for i in hits.image[unit][:count]]
    input_size = info.input_size
    images = opened.images(ids)
    loaded = opened.loaded
    normalize = Normalize(info.mean, info.std, device)
    x = normalize(torch.stack([image.pixels for image in images]))
    ys = torch.as_tensor(hits.y[unit][:count], dtype=torch.int64)
    xs = torch.as_tensor(hits.x[unit][:count], dtype=torch.int64)
    boxes = [(int(a), int(b), int(c), int(d)) for a, b, c, d in hits.box[unit][:count]]
    black = normalize.bounds()[0]
    with query_numerics(info, device).running(torch.device(device)):
        result = attribute_methods(loaded.module, layer, unit, x, ys, xs, boxes, settings, black)
    recorded = hits.value[unit][:count]
    check_reproduced(layer, unit, [images[i].path for i in range(count)], recorded, result.values.cpu().numpy(),
                     info.precision)
    checked = None
    if sanity > 0:
        with query_numerics(info, device).running(torch.device(device)):
            checked = sanity_check(loaded.module, layer, unit, x, ys, xs, boxes, settings,
                                   result.maps, sanity, seed, black)
    rows = []
    for rank in range(count):
        box = tuple(int(v) for v in hits.box[unit][rank])
        geometry = images[rank].geometry
        rows.append(Hit(rank, ids[rank], images[rank].path, float(recorded[rank]),
                        float(result.values[rank]), int(hits.y[unit][rank]), int(hits.x[unit][rank]),
                        box, geometry.to_original(box), (geometry.height, geometry.width)))  # type: ignore[arg-type]
    distribution = opened.reader.distribution(layer, unit)
    level = None if distribution is None or lowest else distribution.quantiles[0.99]
    maps = UnitMaps(result.unit_maps.cpu().numpy(), hits.grid.field(), input_size, level)
    return NeuronResult(opened.path, layer, unit, hits.grid.channels, input_size, hits.grid.rf_size, rows, images,
                        {m: t.numpy() for m, t in result.maps.items()}, maps, result.unguided, distribution,
                        opened.reader.unit_classes(layer, unit), lowest, checked,
                        settings.cam_layer if Method.GRAD_CAM in settings.methods else None)


def check_reproduced(layer: str, unit: int, paths: list[str], recorded: np.ndarray, now: np.ndarray,
                     precision: Precision = Precision.FP32) -> None:
    """Each hit's recomputed activation against the index's, within the tolerance of the precision it was built in
    (relative, and absolute against the unit's best score: a near-zero hit has no meaningful relative error)."""
    tolerance = precision.tolerance
    scale = max(1.0, float(np.abs(recorded).max()))
    for path, before, after in zip(paths, recorded, now, strict=True):
        if not math.isclose(float(before), float(after), rel_tol=tolerance, abs_tol=tolerance * scale):
            raise UserError(f"layer '{layer}' unit {unit} gives {after:.4g} on '{path}' now but {before:.4g} in "
                            "the index: the model, its weights or the image changed since the build; rebuild "
                            "the index, or pass the original --weights / --data-root")


def save_maps(result: NeuronResult, path: Path) -> None:
    """The per-hit maps as arrays, with the hits they belong to; written atomically. Gradient maps and the
    activation map upsampled to the input are in network-input pixels; `activation_original_R` is hit R's in
    its original image's pixels (NaN outside the crop); masks are where the map reaches the unit's p99 `level`."""
    at_input = result.maps.at_input()  # (n, S, S)
    arrays: dict[str, Any] = {
        **{method.value: values.astype(np.float32) for method, values in result.attributions.items()},
        "activation": result.maps.maps, "activation_input": at_input,
        "image_id": np.array([h.image_id for h in result.hits], dtype=np.int64),
        "score": np.array([h.score for h in result.hits], dtype=np.float32),
        "position": np.array([[h.y, h.x] for h in result.hits], dtype=np.int32).reshape(-1, 2),
        "box": np.array([h.box for h in result.hits], dtype=np.int32).reshape(-1, 4)}
    for rank, image in enumerate(result.images):
        arrays[f"activation_original_{rank}"] = result.maps.at_original(rank, image.geometry)
    if result.maps.level is not None:
        arrays["level"] = np.float32(result.maps.level)
        arrays["mask_input"] = result.maps.masks(at_input)
        for rank in range(len(result.images)):
            arrays[f"mask_original_{rank}"] = result.maps.masks(arrays[f"activation_original_{rank}"])
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, **arrays)


def describe_unguided(unguided: dict[str, int]) -> str:
    if not unguided:
        return ""
    names = ", ".join(f"{name} ({count}x)" for name, count in collections.Counter(unguided).most_common())
    return (f"guided backprop is not defined for {names}: gradients pass through them unchanged, so the guided "
            "maps are only partly guided")

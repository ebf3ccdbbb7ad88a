"""The atlas's pictures, as independent tasks: each writes its files under their final names (atomically) and
nothing else, so tasks run in any order, in any process, and a crash loses at most the tasks in flight.

- tiles:  a unit's best patch (p0), for every unit of a layer page, pages or not; no network needed;
- units:  a unit's patches, guided-backprop crops and activation maps (with masks) for all its hits, and its
          dream; the hits' images are
          decoded once per task, run through the network in fixed sub-batches, and checked against the index;
- images: whole-image thumbnails for image pages and their neighbours.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from actindex.indexer.atomic import atomic_write
from actindex.indexer.images import Normalize
from actindex.kernels.errors import UserError

from ..attribution import attribute_methods
from ..dream import DreamConfig, dream
from ..loading import LoadedImage, data_root, load_index_images, load_index_model, query_numerics
from ..maps import UnitMaps
from ..neuron import check_reproduced
from ..render import activation_pictures, map_image, patch
from .plan import Plan

PATCH = 128  # longest side of a stored patch or guided crop; smaller ones are stored as they are
THUMB = 320  # longest side of a stored whole image
MAP = 224  # longest side of a stored activation map or mask over a whole image
QUALITY = 82  # WebP quality: patches are small, artefacts at 82 are hard to see


@dataclass(frozen=True)
class Task:
    kind: str  # "tiles", "units" or "images"
    layer: str  # "" for images
    items: tuple[int, ...]  # units or image ids


@dataclass
class Outcome:
    files: int = 0
    units: int = 0
    unguided: dict[str, dict[str, int]] = field(default_factory=dict)  # per layer
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # image id -> original (height, width)


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "webp":
        image.save(buffer, format="WEBP", quality=QUALITY, method=4)
    else:
        # zlib level 3: a fifth of `optimize`'s time for files about 10 % larger (an atlas holds thousands)
        image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def shrink(image: Image.Image, size: int) -> Image.Image:
    """At most `size` pixels on the longer side (Lanczos); never enlarged: the page scales small patches with
    `image-rendering: pixelated`, so their pixels stay honest and their files small."""
    if max(image.size) <= size:
        return image
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.LANCZOS)


class Worker:
    """Runs tasks for one process: the network is loaded on first need, decoded images are kept a while."""

    def __init__(self, plan: Plan, device: str, data: Any, weights: str | None, batch_size: int,
                 dream_steps: int) -> None:
        self.plan = plan
        self.device = device
        self.root = data_root(plan.info, data)
        self.root_given = data is not None
        self.weights = weights
        self.batch_size = batch_size
        self.dream_steps = dream_steps
        self._model: torch.nn.Module | None = None
        self._images: OrderedDict[int, LoadedImage] = OrderedDict()

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = load_index_model(self.plan.info, self.weights, self.device).module
        return self._model

    def images(self, ids: list[int]) -> list[LoadedImage]:
        missing = sorted({i for i in ids if i not in self._images})
        loaded = load_index_images(self.root, [self.plan.paths[i] for i in missing], self.plan.info,
                                   self.root_given, self.device)
        for image_id, image in zip(missing, loaded, strict=True):
            self._images[image_id] = image
        result = [self._images[i] for i in ids]
        for image_id in ids:
            self._images.move_to_end(image_id)
        while len(self._images) > 512:
            self._images.popitem(last=False)
        return result

    def save(self, image: Image.Image, name: str) -> None:
        atomic_write(self.plan.site / name, encode(image, self.plan.image_format))

    def run(self, task: Task) -> Outcome:
        if task.kind == "tiles":
            return self.tiles(task.layer, task.items)
        if task.kind == "units":
            return self.units(task.layer, task.items)
        if task.kind == "images":
            return self.thumbnails(task.items)
        raise ValueError(f"unknown task kind {task.kind!r}")

    def tiles(self, layer: str, units: tuple[int, ...]) -> Outcome:
        hits = self.plan.layers[layer].hits
        units = tuple(u for u in units if hits.image[u, 0] >= 0)
        images = self.images([int(hits.image[u, 0]) for u in units])
        for unit, image in zip(units, images, strict=True):
            y0, x0, y1, x1 = (int(v) for v in hits.box[unit, 0])
            self.save(shrink(patch(image, (y0, x0, y1, x1)), PATCH), self.plan.unit_file(layer, unit, "p0"))
        return Outcome(files=len(units))

    def units(self, layer: str, units: tuple[int, ...]) -> Outcome:
        """Patches and guided crops of every hit of `units`, one (unit, hit) pair per batch row."""
        plan, hits = self.plan, self.plan.layers[layer].hits
        pairs = [(u, r) for u in units for r in range(plan.hit_count(layer, u))]
        outcome = Outcome(units=len(units))
        normalize = Normalize(plan.info.mean, plan.info.std, self.device)
        black = normalize.bounds()[0]
        numerics = query_numerics(plan.info, self.device)
        unguided: dict[str, int] = {}
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start:start + self.batch_size]
            ids = [int(hits.image[u, r]) for u, r in batch]
            images = self.images(ids)
            x = normalize(torch.stack([image.pixels for image in images]))  # (B, 3, S, S)
            channels = torch.tensor([u for u, _ in batch])
            ys = torch.tensor([int(hits.y[u, r]) for u, r in batch])
            xs = torch.tensor([int(hits.x[u, r]) for u, r in batch])
            boxes = [(int(a), int(b), int(c), int(d)) for a, b, c, d in (hits.box[u, r] for u, r in batch)]
            with numerics.running(torch.device(self.device)):
                result = attribute_methods(self.model, layer, channels, x, ys, xs, boxes, plan.settings, black)
            for name, count in result.unguided.items():
                unguided[name] = unguided.get(name, 0) + count
            recorded = np.array([hits.value[u, r] for u, r in batch], dtype=np.float32)
            now = result.values.cpu().numpy()
            for unit in sorted({u for u, _ in batch}):
                rows = [i for i, (u, _) in enumerate(batch) if u == unit]
                check_reproduced(layer, unit, [images[i].path for i in rows], recorded[rows], now[rows],
                                 plan.info.precision)
            attributions = {m: t.numpy() for m, t in result.maps.items()}  # (B, 3 or 1, S, S) each
            maps = result.unit_maps.cpu().numpy()  # (B, H, W)
            for row, ((unit, rank), image) in enumerate(zip(batch, images, strict=True)):
                y0, x0, y1, x1 = (int(v) for v in hits.box[unit, rank])
                self.save(shrink(patch(image, (y0, x0, y1, x1)), PATCH), plan.unit_file(layer, unit, f"p{rank}"))
                for method, values in attributions.items():
                    crop = map_image(values[row][:, y0:y1, x0:x1])
                    self.save(shrink(crop, PATCH), plan.unit_file(layer, unit, plan.method_file(method, rank)))
                unit_maps = UnitMaps(maps[row:row + 1], hits.grid.field(), plan.info.input_size,
                                     plan.layers[layer].level(unit))
                overlay, mask = activation_pictures(unit_maps, 0, image, float(hits.value[unit, 0]), MAP)
                self.save(overlay, plan.unit_file(layer, unit, f"a{rank}"))
                if mask is not None:
                    self.save(mask, plan.unit_file(layer, unit, f"m{rank}"))
                outcome.files += 2 + len(attributions) + (mask is not None)
        for unit in units:
            if unit in plan.dreams.get(layer, set()):
                self.save(self.dream(layer, unit), plan.unit_file(layer, unit, "dream"))
                outcome.files += 1
        outcome.unguided[layer] = unguided
        return outcome

    def dream(self, layer: str, unit: int) -> Image.Image:
        hits = self.plan.layers[layer].hits
        objective = "center" if hits.grid.height * hits.grid.width > 1 else "mean"
        config = DreamConfig(objective=objective, steps=self.dream_steps, input_size=self.plan.info.input_size)
        try:
            result = dream(self.model, layer, unit, self.plan.info.mean, self.plan.info.std, config,
                           self.device)
        except UserError as error:
            raise UserError(f"dream of layer '{layer}' unit {unit}: {error}") from error
        return shrink(Image.fromarray(result.image), THUMB)

    def thumbnails(self, ids: tuple[int, ...]) -> Outcome:
        outcome = Outcome(files=len(ids))
        for image_id, image in zip(ids, self.images(list(ids)), strict=True):
            self.save(shrink(image.original, THUMB), self.plan.image_file(image_id))
            outcome.sizes[image_id] = (image.original.height, image.original.width)
        return outcome


def start_worker(plan: Plan, device: str, data: Any, weights: str | None, batch_size: int, dream_steps: int,
                 threads: int) -> Callable[[Task], Outcome]:
    """In a worker process of the pool: the function that runs its tasks."""
    torch.set_num_threads(threads)
    return Worker(plan, device, data, weights, batch_size, dream_steps).run

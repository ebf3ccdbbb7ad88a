"""`actindex atlas`: a static site of an index's layers, units and images, built incrementally and in parallel.

The expensive part is per unit (decode its hit images, guided backprop through the network up to its layer,
crop and encode): those are tasks run by `jobs` processes, and a unit whose pictures are all on disk is not
redone, so a crashed or interrupted build continues where it stopped, and a later run with more layers or
units adds only what is new. The forward pass over the dataset is never re-run: only hit images are.
Pages are rewritten from scratch by every run (they are cheap), after all pictures exist.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from actindex.indexer.index_file import IndexInfo, IndexReader, LayerGrid, UnitClasses
from actindex.indexer.signals import describe, stops_raise
from actindex.kernels.errors import Interrupted, UserError, not_found
from actindex.kernels.overlap import nearest_by_overlap

from ..attribution import Method, Settings
from .pages import site_size, write_pages
from .plan import (
    FORMATS,
    OWN,
    Layer,
    NearestUnits,
    PatchLink,
    Plan,
    SiteManifest,
    index_identity,
    parse_units,
    slug,
)
from .pool import KillTask, TaskPool
from .work import Outcome, Task, Worker, start_worker

SKIPPED_SHOWN = 100  # unreadable files listed on the front page (the count is given in full)
UNITS_PER_TASK = 16  # units are grouped by unit // 16, so a unit's batch never depends on --jobs
TILES_PER_TASK = 256
IMAGES_PER_TASK = 64


class InjectedCrash(RuntimeError):
    """Testing: the build stops here as a crash would (`AtlasFault.crash_after`)."""


@dataclass(frozen=True)
class AtlasFault:
    """Failures injected on purpose, for tests: the run stops as a crash would after `crash_after` tasks, and
    the worker that runs task `kill.task` dies by SIGKILL (the build's counterpart is `indexer.stream.Fault`)."""

    crash_after: int | None = None
    kill: KillTask | None = None

    def after(self, done: int) -> None:
        if self.crash_after is not None and done >= self.crash_after:
            raise InjectedCrash(f"injected crash after {done} tasks")


@dataclass(frozen=True)
class AtlasConfig:
    index: Path
    out: Path
    layers: tuple[str, ...] | None = None  # None: every layer of the index
    units: str | None = None  # which units get a page ('0-15,classifier:967'); None: all of the chosen layers
    dream: bool = False  # also a dream image for the chosen units
    jobs: int = 1  # worker processes; 1 runs in this process
    batch_size: int | None = None  # (unit, hit) pairs per backward pass; None: 8 on the CPU, 64 on a GPU
    device: str = "cpu"
    data: Path | None = None  # where the images are now, if they moved
    weights: str | None = None  # where the weights file is now, if it moved
    image_format: str = "webp"
    neighbours: int = 8  # nearest images per image page
    patch_boxes: int = 3  # strongest boxes per image page searched for alike patches (indexes with --patch-layer)
    patch_hits: int = 6  # patches shown per box, one per image
    nearest_units: int = 8
    dream_steps: int = 200
    overwrite: bool = False  # replace a site built from another index
    methods: tuple[Method, ...] | None = None  # attribution maps on unit pages; None: the site's (guided at first)
    cam_layer: str | None = None  # for grad-cam

    def check(self) -> None:
        if self.image_format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, not '{self.image_format}'")
        for name, value in (("--jobs", self.jobs), ("--batch-size", self.batch_size or 1)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.neighbours < 0 or self.nearest_units < 0 or self.dream_steps < 1 or self.patch_boxes < 0 \
                or self.patch_hits < 1:
            raise UserError("--neighbours, --patch-boxes and nearest units must be at least 0, patch hits and dream "
                            "steps at least 1")


@dataclass(frozen=True)
class AtlasSummary:
    site: Path
    front_page: Path
    layers: int
    unit_pages: int
    units_computed: int  # units whose pictures this run made (the rest were already there)
    image_pages: int
    files: int
    page_bytes: int
    picture_bytes: int
    seconds: float


def build_atlas(config: AtlasConfig, progress: bool = False, *, fault: AtlasFault | None = None) -> AtlasSummary:
    """Build or extend the site at `config.out` from the index at `config.index`."""
    config.check()
    start = time.perf_counter()
    site = config.out
    with IndexReader(config.index) as reader:
        identity = index_identity(reader)
        manifest = _open_site(config, identity)
        info = reader.info
        manifest.data_root, manifest.weights = str(info.data_root), info.weights
        if config.methods is not None:
            manifest.methods, manifest.cam_layer = [m.value for m in config.methods], config.cam_layer or ""
        settings = Settings(tuple(Method(m) for m in manifest.methods), manifest.cam_layer or None)
        settings.check("the atlas's layers")
        names = reader.layer_names
        chosen = list(config.layers) if config.layers else names
        for name in chosen:
            if name not in names:
                raise not_found("layer", name, names, hint=f"these are the layers of '{config.index}'")
        manifest.layers = [name for name in names if name in chosen or name in manifest.layers]
        layers = {name: Layer(reader.layer(name), "", reader.layer_mean(name), reader.layer_profile(name))
                  for name in manifest.layers}
        layers = _with_slugs(layers)
        channels = {name: layers[name].hits.grid.channels for name in chosen}
        requested = parse_units(config.units, channels) if config.units else \
            {name: set(range(count)) for name, count in channels.items()}
        for name, units in requested.items():
            manifest.units[name] = sorted(set(manifest.units.get(name, [])) | units)
            if config.dream:
                manifest.dreams[name] = sorted(set(manifest.dreams.get(name, [])) | units)
        pages = {name: units for name, units in manifest.units.items() if units}
        image_pages = sorted({int(i) for name, units in pages.items() for i in layers[name].hits.image[units].ravel()
                              if i >= 0})
        neighbours, similarity_layer = _neighbours(info, reader, image_pages, config.neighbours)
        patch_links = _patch_links(info, reader, image_pages, config.patch_boxes, config.patch_hits)
        shown = sorted({int(i) for layer in layers.values() for i in layer.hits.image.ravel() if i >= 0}
                       | {i for near in (neighbours or {}).values() for i, _ in near}
                       | {hit[0] for links in (patch_links or {}).values() for link in links for hit in link.hits})
        plan = Plan(index=config.index.resolve(), site=site, image_format=manifest.image_format, info=info,
                    paths=dict(zip(shown, reader.paths_of(shown), strict=True)),
                    labels=dict(zip(image_pages, reader.labels_of(image_pages).tolist(), strict=True)),
                    classes=reader.classes(), skipped=reader.skipped(SKIPPED_SHOWN),
                    skipped_count=reader.num_skipped, layers=layers, pages=pages,
                    dreams={name: set(units) for name, units in manifest.dreams.items()},
                    nearest=_nearest_units(layers, config.nearest_units), image_pages=image_pages,
                    neighbours=neighbours, similarity_layer=similarity_layer,
                    unit_classes=_unit_classes(reader, pages), settings=settings, patch_links=patch_links,
                    patch_layer=info.patch_layer if patch_links is not None else "")
    site.mkdir(parents=True, exist_ok=True)
    manifest.write(site)
    tasks = _tasks(plan, manifest)
    computed = sum(len(task.items) for task in tasks if task.kind == "units")
    done = 0
    try:
        with stops_raise():
            for outcome in _run(tasks, plan, config, progress, fault or AtlasFault()):
                for name, counts in outcome.unguided.items():
                    manifest.unguided[name] = counts
                manifest.sizes.update(outcome.sizes)
                done += 1
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", 2)
        raise Interrupted(f"stopped by {describe(signum)} after {done} of {len(tasks)} tasks; the pictures made so "
                          f"far are kept in '{site}' (its pages are written at the end of a run): run the same "
                          "command again to continue where it stopped", signum) from None
    finally:
        manifest.write(site)  # keep what finished (image sizes) for the next run
    write_pages(plan, manifest.unguided, manifest.sizes)
    files, page_bytes, picture_bytes = site_size(site)
    return AtlasSummary(site=site, front_page=site / "index.html", layers=len(plan.layers),
                        unit_pages=sum(len(u) for u in plan.pages.values()), units_computed=computed,
                        image_pages=len(plan.image_pages), files=files, page_bytes=page_bytes,
                        picture_bytes=picture_bytes, seconds=time.perf_counter() - start)


def _open_site(config: AtlasConfig, identity: str) -> SiteManifest:
    """The site's manifest, or a new one; a site of another index is replaced only with `overwrite`."""
    manifest = SiteManifest.read(config.out)
    if manifest is not None and manifest.identity != identity:
        if not config.overwrite:
            raise UserError(f"'{config.out}' is an atlas of another index ('{manifest.index}', or that file changed "
                            "since); give a new --out, or pass --overwrite to replace it")
        for name in OWN:
            path = config.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        manifest = None
    if manifest is not None and manifest.image_format != config.image_format:
        raise UserError(f"'{config.out}' holds {manifest.image_format} pictures; pass --format "
                        f"{manifest.image_format} to extend it, or give a new --out")
    return manifest or SiteManifest(index=str(config.index.resolve()), identity=identity,
                                image_format=config.image_format)


def _unit_classes(reader: IndexReader, pages: dict[str, list[int]]) -> dict[str, dict[int, UnitClasses]]:
    """The best classes of each unit with a page; {} for indexes without classes."""
    found: dict[str, dict[int, UnitClasses]] = {}
    for name, units in pages.items():
        for unit in units:
            classes = reader.unit_classes(name, unit)
            if classes is None:
                return {}
            found.setdefault(name, {})[unit] = classes
    return found


def _with_slugs(layers: dict[str, Layer]) -> dict[str, Layer]:
    """Give each layer a distinct file name, even when two names differ only in characters '_' replaces."""
    taken: set[str] = set()
    result = {}
    for name, layer in layers.items():
        base = candidate = slug(name)
        number = 2
        while candidate.lower() in taken:  # lower: case-insensitive file systems
            candidate, number = f"{base}-{number}", number + 1
        taken.add(candidate.lower())
        result[name] = Layer(layer.hits, candidate, layer.mean, layer.profile)
    return result


def _nearest_units(layers: dict[str, Layer], n: int) -> NearestUnits:
    names = list(layers)
    tables = [torch.from_numpy(layers[name].hits.image) for name in names]  # (C_l, k) each
    offsets = np.cumsum([0] + [t.shape[0] for t in tables])
    index, _, count = nearest_by_overlap(torch.cat(tables) if tables else torch.zeros(0, 1, dtype=torch.int64), n)
    return NearestUnits(
        layer=[name for name, t in zip(names, tables, strict=True) for _ in range(t.shape[0])],
        channel=np.concatenate([np.arange(t.shape[0]) for t in tables]) if tables else np.zeros(0, np.int64),
        index=index.numpy(), count=count.numpy(), first={name: int(offsets[i]) for i, name in enumerate(names)})


def _neighbours(info: IndexInfo, reader: IndexReader, image_pages: list[int],
                k: int) -> tuple[dict[int, list[tuple[int, float]]] | None, str]:
    """Each image page's nearest images from the index's FAISS index, and the layer they are nearest by (None
    and "" when the index has no FAISS index)."""
    from actindex.indexer.similarity import open_vector_index

    record = info.faiss
    if record is None or record.layer not in reader.embedding_names or not image_pages or k == 0:
        return None, ""
    stored = reader.embeddings(record.layer)
    similarity = open_vector_index(reader, record.layer)
    neighbours = {}
    try:
        for start in range(0, len(image_pages), 4096):
            ids = image_pages[start:start + 4096]  # increasing, as h5py reads them
            scores, found = similarity.search(stored[ids].astype(np.float32), k + 1)  # (Q, k + 1): itself first
            for image_id, row_scores, row_ids in zip(ids, scores, found, strict=True):
                neighbours[image_id] = [(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True)
                                        if i >= 0 and i != image_id][:k]
    finally:
        similarity.close()
    return neighbours, similarity.layer


def _patch_links(info: IndexInfo, reader: IndexReader, image_pages: list[int], boxes: int,
                 k: int) -> dict[int, list[PatchLink]] | None:
    """Per image page, its `boxes` strongest positions of the patch layer (`strongest_positions`), each with the k
    patches of other images most like it, one per image; None when the index has no patch index."""
    from actindex.indexer.similarity import open_vector_index

    from ..patches import nearest_patches, strongest_positions

    if info.patch_faiss is None or info.patch_layer not in reader.patch_names or not image_pages or boxes == 0:
        return None
    grid = reader.patch_grid(info.patch_layer)
    stored = reader.patches(grid.layer)
    similarity = open_vector_index(reader, grid.layer, patches=True)
    links: dict[int, list[PatchLink]] = {}
    try:
        for image_id in image_pages:
            vectors = np.asarray(stored[image_id * grid.positions:(image_id + 1) * grid.positions], np.float32)
            if not np.isfinite(vectors).all():
                continue
            found = []
            for y, x in strongest_positions(vectors, grid, boxes):
                hits = nearest_patches(similarity, vectors[y * grid.width + x][None], k, 1, grid, exclude=image_id)
                found.append(PatchLink(y, x, _input_box(grid, y, x, info.input_size),
                                       tuple((image, score, _input_box(grid, hy, hx, info.input_size))
                                             for image, hy, hx, score in hits)))
            links[image_id] = found
    finally:
        similarity.close()
    return links


def _input_box(grid: LayerGrid, y: int, x: int, size: int) -> tuple[int, int, int, int]:
    y0, x0, y1, x1 = (int(v) for v in grid.boxes(np.array(y), np.array(x), size))
    return y0, x0, y1, x1


def _tasks(plan: Plan, manifest: SiteManifest) -> list[Task]:
    """What is missing: units whose pictures are not all there, tiles, thumbnails of unknown size."""
    tasks = []
    for name in plan.layers:
        pages = set(plan.pages.get(name, ()))
        todo = [u for u in sorted(pages) if not plan.unit_done(name, u)]
        for group in _groups(todo, lambda u: u // UNITS_PER_TASK):
            tasks.append(Task("units", name, group))
        channels = plan.layers[name].hits.grid.channels
        tiles = [u for u in range(channels) if u not in pages and plan.hit_count(name, u) > 0
                 and not (plan.site / plan.unit_file(name, u, "p0")).is_file()]
        for group in _groups(tiles, lambda u: u // TILES_PER_TASK):
            tasks.append(Task("tiles", name, group))
    shown = set(plan.image_pages)
    for near in (plan.neighbours or {}).values():
        shown.update(i for i, _ in near)
    for links in (plan.patch_links or {}).values():
        shown.update(hit[0] for link in links for hit in link.hits)
    images = [i for i in sorted(shown) if i not in manifest.sizes or not (plan.site / plan.image_file(i)).is_file()]
    for start in range(0, len(images), IMAGES_PER_TASK):
        tasks.append(Task("images", "", tuple(images[start:start + IMAGES_PER_TASK])))
    return tasks


def _groups(items: list[int], key: Callable[[int], int]) -> Iterator[tuple[int, ...]]:
    groups: dict[int, list[int]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    for group in groups.values():
        yield tuple(group)


def _run(tasks: list[Task], plan: Plan, config: AtlasConfig, progress: bool, fault: AtlasFault) -> Iterator[Outcome]:
    # On a CPU, small batches are faster per image: activations of large batches fall out of the caches
    # (docs/BENCHMARKS.md, the atlas).
    batch_size = config.batch_size or (8 if config.device == "cpu" else 64)
    bar = tqdm(total=len(tasks), desc="atlas", unit="task", disable=not progress or not tasks)
    done = 0
    try:
        if config.jobs == 1 or len(tasks) <= 1:
            worker = Worker(plan, config.device, config.data, config.weights, batch_size, config.dream_steps)
            outcomes: Iterator[Outcome] = (worker.run(task) for task in tasks)
            for outcome in outcomes:
                yield outcome
                done += 1
                bar.update()
                fault.after(done)
            return
        threads = max(1, (os.cpu_count() or 1) // config.jobs) if config.device == "cpu" else 1
        pool: TaskPool[Task, Outcome] = TaskPool(
            config.jobs, start_worker, (plan, config.device, config.data, config.weights, batch_size,
                                        config.dream_steps, threads), kill=fault.kill,
            note=(lambda text: bar.write(text, file=sys.stderr)) if progress else None)
        with closing(pool.run(tasks)) as results:  # closed, its workers stopped, however this loop ends
            for _, outcome in results:
                yield outcome
                done += 1
                bar.update()
                fault.after(done)
    finally:
        bar.close()

"""`build_index`: stream an image folder through a network and write the per-unit top-k index."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import torch

from actindex.kernels.receptive_field import LayerGeometry, boxes
from actindex.kernels.spatial import unravel
from actindex.kernels.topk import TopKResult

from .accumulate import IndexAccumulator
from .errors import UserError, not_found
from .images import DEFAULT_MAX_PIXELS, ImageDataset, ImageList, scan_folder
from .index_file import IndexWriter, LayerHits, atomic_output, check_output
from .layers import addressable_layers, resolve_layers
from .models import LoadedModel, load_model


class Progress(Protocol):
    """What the build reports as it goes; the CLI plugs in a tqdm bar, the library default is silent."""

    def update(self, images: int, skipped: int) -> None:
        """`images` more images were handled, `skipped` of them could not be read."""

    def close(self) -> None: ...


ProgressFactory = Callable[[int], Progress]  # called with the number of images


class _Silent:
    def update(self, images: int, skipped: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines an index. Stored as JSON in the file's `config` attribute."""

    data: Path
    model: str
    out: Path
    weights: str | None = None
    layers: tuple[str, ...] | None = None  # None: the model's main stages
    k: int = 9
    input_size: int = 224
    mean: tuple[float, float, float] | None = None  # None: the weights' own, else ImageNet's
    std: tuple[float, float, float] | None = None
    batch_size: int = 64
    workers: int = 4
    device: str | None = None  # None: cuda when present, else cpu
    embed_layer: str | None = None  # None: the last indexed layer; "" for none
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False


@dataclass(frozen=True)
class BuildSummary:
    out: Path
    num_images: int
    indexed: int
    skipped: int
    seconds: float
    layers: tuple[str, ...]
    embed_layer: str | None
    device: str

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else math.inf


def resolve_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise UserError(f"unknown device '{requested}'; use cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{requested}' asked for but CUDA is not available; use --device cpu")
    return device


def validate(config: BuildConfig) -> None:
    """Checks that need no model or data, done before any work."""
    if config.k < 1:
        raise UserError(f"--k must be at least 1, got {config.k}")
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.input_size < 16:
        raise UserError(f"--input-size must be at least 16 pixels, got {config.input_size}")
    if config.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {config.workers}")
    for label, stats in (("mean", config.mean), ("std", config.std)):
        if stats is not None and len(stats) != 3:
            raise UserError(f"--{label} takes three numbers (R,G,B), got {len(stats)}")
    if config.std is not None and any(s <= 0 for s in config.std):
        raise UserError("--std values must be positive")
    check_output(config.out, config.overwrite)


@dataclass
class _Plan:
    """What a build resolved before streaming: the model, its layers and the image list."""

    config: BuildConfig
    loaded: LoadedModel
    geometry: dict[str, LayerGeometry]
    embed_layer: str | None
    images: ImageList
    device: torch.device
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def plan_build(config: BuildConfig) -> _Plan:
    validate(config)
    images = scan_folder(config.data)
    if len(images.paths) >= 2**32:
        raise UserError("more than 2**32 images; split the folder")
    device = resolve_device(config.device)
    loaded = load_model(config.model, config.weights, device)
    geometry = resolve_layers(loaded.module, config.layers, config.input_size, device)
    embed_layer = _embed_layer(config, loaded, list(geometry))
    mean = config.mean or loaded.mean
    std = config.std or loaded.std
    return _Plan(config, loaded, geometry, embed_layer, images, device, tuple(mean), tuple(std))  # type: ignore[arg-type]


def _embed_layer(config: BuildConfig, loaded: LoadedModel, layers: list[str]) -> str | None:
    if config.embed_layer == "":
        return None
    if config.embed_layer is None:
        return layers[-1]
    names = addressable_layers(loaded.module)
    if config.embed_layer not in names:
        raise not_found("layer", config.embed_layer, names, hint="for --embed-layer")
    return config.embed_layer


def build_index(config: BuildConfig, progress: ProgressFactory | None = None) -> BuildSummary:
    """Build the index described by `config`; the file appears at `config.out` only when complete."""
    plan = plan_build(config)
    started = time.perf_counter()
    with atomic_output(config.out, config.overwrite) as tmp, h5py.File(tmp, "w") as h5:
        writer = IndexWriter(h5)
        writer.write_images(plan.images.paths, plan.images.labels, plan.images.classes)
        accumulator = IndexAccumulator(plan.loaded.module, {n: g.channels for n, g in plan.geometry.items()},
                                       config.k, plan.mean, plan.std, plan.embed_layer, plan.device)
        bar = (progress or (lambda total: _Silent()))(len(plan.images.paths))
        try:
            skipped = _stream(plan, accumulator, writer, bar)
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        for name, result in accumulator.results().items():
            writer.write_layer(layer_hits(plan.geometry[name], result, config.input_size))
        writer.write_skipped([(plan.images.paths[i], reason) for i, reason in skipped])
        writer.write_attrs(_attrs(plan, len(skipped), seconds))
    return BuildSummary(config.out, len(plan.images.paths), len(plan.images.paths) - len(skipped), len(skipped),
                        seconds, tuple(plan.geometry), plan.embed_layer, str(plan.device))


def _stream(plan: _Plan, accumulator: IndexAccumulator, writer: IndexWriter, bar: Progress) -> list[tuple[int, str]]:
    """Feed every image through the accumulator in id order; write embeddings as they come."""
    config = plan.config
    n = len(plan.images.paths)
    dataset = ImageDataset(plan.images.root, plan.images.paths, range(n), config.input_size, config.max_pixels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                                         num_workers=config.workers, collate_fn=dataset.collate_fn,
                                         pin_memory=plan.device.type == "cuda",
                                         prefetch_factor=4 if config.workers > 0 else None)
    embeddings = None
    if plan.embed_layer is not None:
        dim = _embedding_dim(plan)
        embeddings = writer.create_embeddings(plan.embed_layer, n, dim)
    sink = RowSink(embeddings)
    skipped: list[tuple[int, str]] = []
    start = 0  # the loader yields batches in id order: this batch covers ids [start, start + len)
    for batch in loader:
        count = batch.ids.numel() + len(batch.skipped)
        sink.push(start, count, batch.ids, accumulator.add_batch(batch.pixels, batch.ids))
        skipped += batch.skipped
        bar.update(count, len(batch.skipped))
        start += count
    sink.flush()
    return skipped


def _embedding_dim(plan: _Plan) -> int:
    if plan.embed_layer in plan.geometry:
        return plan.geometry[plan.embed_layer].channels
    from actindex.kernels.receptive_field import trace_geometry

    assert plan.embed_layer is not None
    geometry = trace_geometry(plan.loaded.module, plan.config.input_size, [plan.embed_layer], device=plan.device)
    if plan.embed_layer not in geometry:
        raise UserError(f"--embed-layer '{plan.embed_layer}' does not run in the forward pass; choose another")
    return geometry[plan.embed_layer].channels


class RowSink:
    """Writes each batch's embedding rows one batch late, so the device→host copy overlaps the next batch.

    `dataset` is anything with `.shape` and slice assignment: an (N, D) h5py dataset, or a numpy array.
    """

    def __init__(self, dataset: h5py.Dataset | np.ndarray | None) -> None:
        self.dataset = dataset
        self.pending: tuple[int, int, torch.Tensor, torch.Tensor, torch.cuda.Event | None] | None = None

    def push(self, start: int, count: int, ids: torch.Tensor, rows: torch.Tensor | None) -> None:
        if self.dataset is None or rows is None:
            return
        copied = None
        if rows.is_cuda:
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)  # (B, D)
            host.copy_(rows, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host = rows
        self.flush()
        self.pending = (start, count, ids, host, copied)

    def flush(self) -> None:
        if self.pending is None or self.dataset is None:
            return
        start, count, ids, host, copied = self.pending
        self.pending = None
        if copied is not None:
            copied.synchronize()
        block = np.full((count, self.dataset.shape[1]), np.nan, dtype=np.float32)  # skipped rows stay NaN
        block[(ids - start).numpy()] = host.numpy()
        self.dataset[start:start + count] = block


def layer_hits(geometry: LayerGeometry, result: TopKResult, input_size: int) -> LayerHits:
    """A layer's top-k result with feature positions and receptive-field boxes, as stored."""
    assert geometry.field is not None
    y, x = unravel(result.positions.cpu(), geometry.width)  # (C, k) each
    box = boxes(geometry.field, y, x, (input_size, input_size))  # (C, k, 4)
    box = box.masked_fill((result.ids.cpu() < 0).unsqueeze(-1), -1)
    fy, fx = geometry.field
    return LayerHits(
        name=geometry.name, channels=geometry.channels, height=geometry.height, width=geometry.width,
        rf_size=(fy.size, fx.size), rf_stride=(fy.stride, fx.stride), rf_padding=(fy.padding, fx.padding),
        value=result.values.cpu().numpy(), image=result.ids.cpu().numpy(), y=y.numpy(), x=x.numpy(),
        box=box.numpy(),
    )


def _attrs(plan: _Plan, skipped: int, seconds: float) -> dict[str, object]:
    from importlib.metadata import version

    config = plan.config
    record = {key: (str(value) if isinstance(value, Path) else value)
              for key, value in dataclasses.asdict(config).items()}
    record.update(layers=list(plan.geometry), embed_layer=plan.embed_layer, mean=list(plan.mean),
                  std=list(plan.std), weights_resolved=plan.loaded.weights,
                  weights_sha256=plan.loaded.weights_sha256, data=str(Path(config.data).resolve()))
    del record["out"], record["overwrite"]
    n = len(plan.images.paths)
    return {
        "model": config.model, "weights": plan.loaded.weights, "weights_sha256": plan.loaded.weights_sha256,
        "input_size": config.input_size, "mean": list(plan.mean), "std": list(plan.std), "k": config.k,
        "data_root": str(Path(config.data).resolve()), "num_images": n, "num_skipped": skipped,
        "layers": json.dumps(list(plan.geometry)), "embed_layer": plan.embed_layer or "",
        "categories": json.dumps(plan.loaded.categories), "config": json.dumps(record, sort_keys=True),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else 0.0, "device": str(plan.device),
        "actindex_version": version("actindex"), "torch_version": str(torch.__version__),
    }

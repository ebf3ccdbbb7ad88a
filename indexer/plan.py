"""Planning a build: its configuration, checked; what it resolves before any image is read (the network, its
layers, the image list), complete and frozen; the fingerprint a checkpoint must match; each process's shard."""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from actindex.kernels.class_sums import FRACTION_BITS
from actindex.kernels.errors import UserError, not_found
from actindex.kernels.histogram import BINS
from actindex.kernels.receptive_field import LayerGeometry, trace_geometry

from .checkpoint import image_list_hash
from .choices import Decoder, Precision
from .distributed import local_world_size
from .images import DEFAULT_MAX_PIXELS, ImageList, scan_folder
from .index_file import LayerGrid, check_output
from .layers import addressable_layers, check_indexable, resolve_layers
from .models import LoadedModel, load_model
from .precision import Numerics, choose_numerics
from .similarity import NONE, check_factory

DEFAULT_CHECKPOINT_EVERY = 50_000  # images per process; docs/DISTRIBUTED.md says what that costs


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines an index. Stored as JSON in the file's `config` attribute."""

    data: Path
    model: str
    out: Path
    weights: str | None = None
    layers: tuple[str, ...] | None = None  # None: the model's main stages
    k: int = 9
    bottom_k: int = 0  # also keep each unit's bottom_k images with the lowest minimum over positions; 0: off
    input_size: int = 224
    mean: tuple[float, float, float] | None = None  # None: the weights' own, else ImageNet's
    std: tuple[float, float, float] | None = None
    batch_size: int = 64
    workers: int | None = None  # decoding processes; None: this node's cores shared among its processes, <= 8
    device: str | None = None  # None: cuda when present, else cpu; under torchrun cuda:LOCAL_RANK
    embed_layer: str | None = None  # None: the last indexed layer; "" for none
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # images per process between checkpoints; 0: never
    resume: bool = False  # continue the partial build beside `out`, if there is one
    faiss_factory: str | None = None  # None: chosen by the data's size; "none": no FAISS file
    patch_layer: str | None = None  # also store every position's vector of this layer, for patch search; None: off
    patch_factory: str | None = None  # the patch vectors' FAISS index; None: chosen (<= 64 bytes a vector); "none"
    decoder: Decoder = Decoder.PIL  # how image files become network inputs (decode.py)
    precision: Precision = Precision.FP32  # what the network computes in (precision.py)


def validate(config: BuildConfig) -> None:
    """Checks that need no model or data, done before any work."""
    if config.k < 1:
        raise UserError(f"--k must be at least 1, got {config.k}")
    if config.bottom_k < 0:
        raise UserError(f"--bottom-k must be 0 (off) or more, got {config.bottom_k}")
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.input_size < 16:
        raise UserError(f"--input-size must be at least 16 pixels, got {config.input_size}")
    if config.workers is not None and config.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {config.workers}")
    if config.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be 0 (never) or more, got {config.checkpoint_every}")
    for label, stats in (("mean", config.mean), ("std", config.std)):
        if stats is not None and len(stats) != 3:
            raise UserError(f"--{label} takes three numbers (R,G,B), got {len(stats)}")
    if config.std is not None and any(s <= 0 for s in config.std):
        raise UserError("--std values must be positive")
    check_output(config.out, config.overwrite)


@dataclass(frozen=True)
class BuildPlan:
    """What a build resolved before streaming: the network, its layers and the image list."""

    config: BuildConfig  # with `workers` resolved
    loaded: LoadedModel
    geometry: dict[str, LayerGeometry]  # the indexed layers, in order
    embed_layer: str | None
    embed_dim: int  # 0 without an embedding layer
    patch_grid: LayerGrid | None  # --patch-layer's positions and receptive field; None: off
    images: ImageList
    device: torch.device
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    numerics: Numerics  # the precision, and the memory format chosen for it on this device


def default_workers() -> int:
    """Decoding processes per process of the job: the cores this process may use, shared among the job's
    processes on this node, at most 8 (DataLoader warns beyond the cores, and gains little beyond 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // local_world_size()))


def plan_build(config: BuildConfig, device: torch.device) -> BuildPlan:
    """Check `config`, then resolve it: every error a build can find without reading images is raised here."""
    validate(config)
    config.decoder.check(device)
    config.precision.check(device)
    if config.workers is None:
        config = dataclasses.replace(config, workers=default_workers())
    images = scan_folder(config.data)
    if len(images.paths) >= 2**32:
        raise UserError("more than 2**32 images; split the folder")
    loaded = load_model(config.model, config.weights, device)
    geometry = resolve_layers(loaded.module, config.layers, config.input_size, device)
    embed_layer = _embed_layer(config, loaded, list(geometry))
    embed_dim = _embedding_dim(loaded, geometry, embed_layer, config.input_size, device)
    if config.faiss_factory not in (None, NONE) and embed_layer is not None:
        check_factory(config.faiss_factory, embed_dim)
    patch_grid = _patch_grid(config, loaded, geometry, device)
    if config.patch_factory not in (None, NONE) and patch_grid is not None:
        check_factory(config.patch_factory, patch_grid.channels)
    mean = config.mean or loaded.mean
    std = config.std or loaded.std
    numerics = choose_numerics(config.precision, device, loaded.module, config.input_size)
    return BuildPlan(config, loaded, geometry, embed_layer, embed_dim, patch_grid, images, device, mean, std,
                     numerics)


def _embed_layer(config: BuildConfig, loaded: LoadedModel, layers: list[str]) -> str | None:
    if config.embed_layer == "":
        return None
    if config.embed_layer is None:
        return layers[-1]
    names = addressable_layers(loaded.module)
    if config.embed_layer not in names:
        raise not_found("layer", config.embed_layer, names, hint="for --embed-layer")
    return config.embed_layer


def _embedding_dim(loaded: LoadedModel, geometry: dict[str, LayerGeometry], embed_layer: str | None,
                   input_size: int, device: torch.device) -> int:
    if embed_layer is None:
        return 0
    if embed_layer in geometry:
        return geometry[embed_layer].channels
    traced = trace_geometry(loaded.module, input_size, [embed_layer], device=device)
    if embed_layer not in traced:
        raise UserError(f"--embed-layer '{embed_layer}' does not run in the forward pass; choose another")
    check_indexable(traced[embed_layer], role="--embed-layer")
    return traced[embed_layer].channels


def _patch_grid(config: BuildConfig, loaded: LoadedModel, geometry: dict[str, LayerGeometry],
                device: torch.device) -> LayerGrid | None:
    """--patch-layer's grid: a layer with a (C, H, W) output and a receptive field, indexed or not."""
    name = config.patch_layer
    if not name:
        return None
    names = addressable_layers(loaded.module)
    if name not in names:
        raise not_found("layer", name, names, hint="for --patch-layer")
    traced = geometry if name in geometry else trace_geometry(loaded.module, config.input_size, [name],
                                                              device=device)
    if name not in traced:
        raise UserError(f"--patch-layer '{name}' does not run in the forward pass; choose another")
    layer = traced[name]
    check_indexable(layer, role="--patch-layer")
    if layer.layout != "CHW" or layer.field is None:
        why = "one vector per image, no positions" if layer.layout == "C" else layer.note
        raise UserError(f"--patch-layer '{name}' has no feature positions with receptive fields ({why}); choose a "
                        "convolutional layer with a spatial map, such as the last indexed stage")
    return LayerGrid.of(layer)


def shard_ranges(n: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous id ranges, one per rank, cut at batch boundaries.

    Cutting whole batches (`batches * rank // world`) means every batch any rank runs is exactly a batch of
    the single-process build, so each image's activations are computed in the same company and the index is
    the same bit for bit whatever the number of processes. Ranks differ by at most one batch.
    """
    batches = -(-n // batch_size)
    cuts = [min(batches * rank // world_size * batch_size, n) for rank in range(world_size + 1)]
    return list(itertools.pairwise(cuts))


def fingerprint(plan: BuildPlan, world_size: int) -> dict[str, object]:
    """What a checkpoint must agree on to be resumed: everything that changes the index or the shards."""
    config = plan.config
    return {"model": config.model, "weights": plan.loaded.weights, "weights_sha256": plan.loaded.weights_sha256,
            "layers": list(plan.geometry), "k": config.k, "bottom_k": config.bottom_k,
            "input_size": config.input_size, "mean": list(plan.mean), "std": list(plan.std),
            "embed_layer": plan.embed_layer, "embed_dim": plan.embed_dim,
            "patch_layer": plan.patch_grid.layer if plan.patch_grid else None,
            "patch_dim": plan.patch_grid.positions * plan.patch_grid.channels if plan.patch_grid else 0,
            "max_pixels": config.max_pixels, "batch_size": config.batch_size, "world_size": world_size,
            "device_type": plan.device.type, "images_count": len(plan.images.paths),
            "decoder": config.decoder.value, "precision": config.precision.value,
            "statistics": f"histogram {BINS} bins, class sums 2^-{FRACTION_BITS}",
            "memory_format": plan.numerics.memory_format,
            "images": image_list_hash(plan.images.paths)}

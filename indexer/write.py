"""The index file a build leaves: the top-k tables (and, on request, the lowest-k) with their receptive-field
boxes, the units' means, the image list and skipped files, the embedding rows and (with --patch-layer) the patch
vectors, and the FAISS files beside it (docs/FORMAT.md). Written whole or not at all; the FAISS files take their
place just before the HDF5 file does, so an index never names a missing FAISS file.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch

from actindex.kernels.receptive_field import LayerGeometry, boxes
from actindex.kernels.spatial import unravel
from actindex.kernels.topk import TopKResult

from . import jpeg
from .accumulate import IndexAccumulator
from .atomic import atomic_path
from .choices import Decoder
from .index_file import PATCH_PREFIX, IndexWriter, LayerGrid, LayerHits, check_output
from .plan import BuildPlan
from .rows import EMBEDDING, PATCHES, RowFile
from .similarity import NONE, index_for, patch_index_for, patch_index_path, vector_index_path, write_vector_index


def write_index(plan: BuildPlan, accumulator: IndexAccumulator, skipped: list[tuple[int, str]],
                copy_rows: dict[str, Callable[[h5py.Dataset], None]], world_size: int,
                seconds: float) -> tuple[float, str]:
    """Write the index at `plan.config.out` from the merged `accumulator`; `copy_rows[rows.EMBEDDING]` fills the
    (N, D) embeddings dataset, `copy_rows[rows.PATCHES]` the (N * H * W, C) patch vectors. Returns the seconds
    spent on the FAISS indexes (0 without) and the FAISS calibrations' notes ("" when they reached their
    targets)."""
    config = plan.config
    check_output(config.out, config.overwrite)
    faiss_seconds, notes = 0.0, []
    readable = len(skipped) < len(plan.images.paths)
    with atomic_path(config.out, durable=True) as tmp:
        vectors = patch_vectors = None
        with h5py.File(tmp, "w") as h5:
            writer = IndexWriter(h5)
            writer.write_images(plan.images.paths, plan.images.labels, plan.images.classes)
            means = accumulator.means(len(plan.images.paths) - len(skipped))
            histograms, class_means = accumulator.histograms(), accumulator.class_means()
            lowest = accumulator.lowest()
            for name, result in accumulator.results().items():
                writer.write_layer(layer_hits(plan.geometry[name], result, config.input_size))
                if name in lowest:
                    writer.write_layer(layer_hits(plan.geometry[name], lowest[name], config.input_size), lowest=True)
                writer.write_mean(name, means[name].numpy())
                writer.write_histogram(name, histograms[name].numpy())
                if name in class_means:
                    writer.write_class_means(name, class_means[name].numpy())
            writer.write_skipped([(plan.images.paths[i], reason) for i, reason in skipped])
            attrs = _attrs(plan, world_size, len(skipped), seconds)
            if plan.embed_layer is not None:
                embeddings = writer.create_embeddings(plan.embed_layer, len(plan.images.paths), plan.embed_dim)
                copy_rows[EMBEDDING](embeddings)
                if config.faiss_factory != NONE and readable:
                    tick = time.perf_counter()
                    vectors, faiss_attrs = index_for(embeddings, config.out, config.faiss_factory)
                    attrs.update(faiss_attrs)
                    faiss_seconds += time.perf_counter() - tick
                    notes.append(str(faiss_attrs["faiss_note"]))
            if plan.patch_grid is not None:
                patches = writer.create_patches(plan.patch_grid, len(plan.images.paths))
                copy_rows[PATCHES](patches)
                attrs["patch_layer"] = plan.patch_grid.layer
                if config.patch_factory != NONE and readable:
                    tick = time.perf_counter()
                    patch_vectors, patch_attrs = patch_index_for(patches, config.out, config.patch_factory)
                    attrs.update(patch_attrs)
                    faiss_seconds += time.perf_counter() - tick
                    notes.append(f"patches: {patch_attrs[PATCH_PREFIX + '_note']}"
                                 if patch_attrs[PATCH_PREFIX + "_note"] else "")
            writer.write_attrs(attrs)
        # Before the HDF5 file appears: it never names a missing FAISS file.
        if vectors is not None:
            write_vector_index(vectors, vector_index_path(config.out))
        if patch_vectors is not None:
            write_vector_index(patch_vectors, patch_index_path(config.out))
    return faiss_seconds, " ".join(note for note in notes if note)


def copy_row_files(dataset: h5py.Dataset, files: list[tuple[Path, int, int]], dim: int,
                   dtype: type = np.float32) -> None:
    """Row files (path, first id, end id) of `dim` values an image into the dataset in id order, 32 MiB at a
    time: memory stays bounded whatever N. An image's row is one row of an (N, D) dataset (embeddings), or
    `dim / C` rows of an (N * H * W, C) one (patch vectors)."""
    width = int(dataset.shape[1])
    per_image = max(dim, 1) // max(width, 1)
    step = max(1, (32 << 20) // (np.dtype(dtype).itemsize * max(dim, 1)))
    for path, start, end in files:
        rows = RowFile(path, start, end, dim, dtype)
        try:
            for a in range(start, end, step):
                b = min(a + step, end)
                dataset[a * per_image:b * per_image] = rows.read(a, b).reshape(-1, width)
        finally:
            rows.close()


def layer_hits(geometry: LayerGeometry, result: TopKResult, input_size: int) -> LayerHits:
    """A layer's top-k (or lowest-k) result with feature positions and receptive-field boxes, as stored."""
    assert geometry.field is not None
    y, x = unravel(result.positions.cpu(), geometry.width)  # (C, k) each
    box = boxes(geometry.field, y, x, (input_size, input_size))  # (C, k, 4)
    box = box.masked_fill((result.ids.cpu() < 0).unsqueeze(-1), -1)
    return LayerHits(grid=LayerGrid.of(geometry), value=result.values.cpu().numpy(), image=result.ids.cpu().numpy(),
                     y=y.numpy(), x=x.numpy(), box=box.numpy())


def _attrs(plan: BuildPlan, world_size: int, skipped: int, seconds: float) -> dict[str, object]:
    from importlib.metadata import version

    config = plan.config
    record = {key: (str(value) if isinstance(value, Path) else value.value if isinstance(value, enum.Enum) else value)
              for key, value in dataclasses.asdict(config).items()}
    record.update(layers=list(plan.geometry), embed_layer=plan.embed_layer, mean=list(plan.mean),
                  std=list(plan.std), weights_resolved=plan.loaded.weights,
                  weights_sha256=plan.loaded.weights_sha256, data=str(Path(config.data).resolve()))
    for operational in ("out", "overwrite", "resume", "checkpoint_every"):  # they never change the index
        del record[operational]
    n = len(plan.images.paths)
    return {
        "model": config.model, "weights": plan.loaded.weights, "weights_sha256": plan.loaded.weights_sha256,
        "input_size": config.input_size, "mean": list(plan.mean), "std": list(plan.std), "k": config.k,
        "bottom_k": config.bottom_k, "data_root": str(Path(config.data).resolve()), "num_images": n,
        "num_skipped": skipped, "layers": json.dumps(list(plan.geometry)), "embed_layer": plan.embed_layer or "",
        "categories": json.dumps(plan.loaded.categories), "config": json.dumps(record, sort_keys=True),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else 0.0, "device": plan.device.type,
        "world_size": world_size, "decoder": config.decoder.value, "precision": config.precision.value,
        "memory_format": plan.numerics.memory_format,
        "jpeg_backend": "" if config.decoder is Decoder.PIL else jpeg.backend(),
        "actindex_version": version("actindex"), "torch_version": str(torch.__version__),
    }

"""Per-image rows on their way to disk: a rank's row files in its partial build, addressed by image id, and the
sink that writes each batch's rows one batch late, so that the device-to-host copy overlaps the next batch.

Two kinds of rows (docs/FORMAT.md): the embedding, D float32 values an image (the embedding layer's spatial
mean); and with --patch-layer, the patch vectors, H * W * C float16 values an image (every position's C
channels, positions in row-major order). Raw little-endian, `(end - start) x dim`; row i is image `start + i`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeAlias

import h5py
import numpy as np
import torch

from actindex.kernels.errors import UserError

EMBEDDING = "embedding"  # RowSink keys, and IndexAccumulator.add_batch's
PATCHES = "patches"


class RowFile:
    """An (end - start, dim) row file of `dtype` addressed by image id, written at any offset, fsync'd on demand.

    `dataset[a:b] = block` and `.shape` make it a sink for `RowSink`, like an h5py dataset.
    """

    def __init__(self, path: Path, start: int, end: int, dim: int, dtype: np.dtype | type = np.float32) -> None:
        self.path, self.start, self.dim = path, start, dim
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shape = (end - start, dim)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = self.shape[0] * dim * self.dtype.itemsize
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)

    def __setitem__(self, rows: slice, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, dtype=self.dtype).data.cast("B")
        offset = (rows.start - self.start) * self.dim * self.dtype.itemsize
        while data:  # a regular file writes everything at once unless the disk is full, which raises
            written = os.pwrite(self.fd, data, offset)
            data, offset = data[written:], offset + written

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows of image ids [start, stop) as (stop - start, dim) of the file's dtype."""
        size = (stop - start) * self.dim * self.dtype.itemsize
        data = os.pread(self.fd, size, (start - self.start) * self.dim * self.dtype.itemsize)
        if len(data) != size:
            raise UserError(f"'{self.path}' is shorter than its checkpoint says; delete the partial build to "
                            "start over")
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, self.dim)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


Dataset: TypeAlias = h5py.Dataset | np.ndarray | RowFile


class RowSink:
    """Writes each batch's rows one batch late, so the device→host copy overlaps the next batch.

    `datasets` maps a kind of row (`EMBEDDING`, `PATCHES`) to anything with `.shape`, `.dtype` and slice
    assignment by image id: a `RowFile`, an (N, D) h5py dataset or a numpy array. Kinds without a dataset are
    dropped.
    """

    def __init__(self, datasets: Mapping[str, Dataset | None]) -> None:
        self.datasets = {kind: dataset for kind, dataset in datasets.items() if dataset is not None}
        self.pending: tuple[int, int, torch.Tensor, dict[str, torch.Tensor], torch.cuda.Event | None] | None = None

    def push(self, start: int, count: int, ids: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Rows (B, D) of each kind for images `ids` within ids [start, start + count); the others are written
        as NaN."""
        if not self.datasets:
            return
        copied = None
        host = {kind: value for kind, value in rows.items() if kind in self.datasets}
        if any(value.is_cuda for value in host.values()):
            for kind, value in host.items():
                host[kind] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)  # (B, D)
                host[kind].copy_(value, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        self.flush()
        self.pending = (start, count, ids, host, copied)

    def flush(self) -> None:
        if self.pending is None:
            return
        start, count, ids, host, copied = self.pending
        self.pending = None
        if copied is not None:
            copied.synchronize()
        for kind, dataset in self.datasets.items():
            block = np.full((count, dataset.shape[1]), np.nan, dtype=dataset.dtype)  # skipped rows stay NaN
            if kind in host:
                block[(ids - start).numpy()] = host[kind].numpy()
            dataset[start:start + count] = block

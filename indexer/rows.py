"""Per-image embedding rows on their way to disk: a rank's row file in its partial build, addressed by image id,
and the sink that writes each batch's rows one batch late, so that the device-to-host copy overlaps the next
batch. Raw little-endian float32, `(end - start) x dim`; row i is image `start + i` (docs/FORMAT.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch

from actindex.kernels.errors import UserError


class RowFile:
    """An (end - start, dim) float32 row file addressed by image id, written at any offset, fsync'd on demand.

    `dataset[a:b] = block` and `.shape` make it a sink for `build.RowSink`, like an h5py dataset.
    """

    def __init__(self, path: Path, start: int, end: int, dim: int) -> None:
        self.path, self.start, self.dim = path, start, dim
        self.shape = (end - start, dim)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = self.shape[0] * dim * 4
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)

    def __setitem__(self, rows: slice, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, dtype=np.float32).data.cast("B")
        offset = (rows.start - self.start) * self.dim * 4
        while data:  # a regular file writes everything at once unless the disk is full, which raises
            written = os.pwrite(self.fd, data, offset)
            data, offset = data[written:], offset + written

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows of image ids [start, stop) as (stop - start, dim) float32."""
        size = (stop - start) * self.dim * 4
        data = os.pread(self.fd, size, (start - self.start) * self.dim * 4)
        if len(data) != size:
            raise UserError(f"'{self.path}' is shorter than its checkpoint says; delete the partial build to "
                            "start over")
        return np.frombuffer(data, dtype=np.float32).reshape(stop - start, self.dim)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class RowSink:
    """Writes each batch's embedding rows one batch late, so the device→host copy overlaps the next batch.

    `dataset` is anything with `.shape` and slice assignment by image id: a `RowFile`, an (N, D) h5py dataset
    or a numpy array.
    """

    def __init__(self, dataset: h5py.Dataset | np.ndarray | RowFile | None) -> None:
        self.dataset = dataset
        self.pending: tuple[int, int, torch.Tensor, torch.Tensor | None, torch.cuda.Event | None] | None = None

    def push(self, start: int, count: int, ids: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Rows (B, D) of images `ids` within ids [start, start + count); the others are written as NaN."""
        if self.dataset is None:
            return
        copied = None
        host = rows
        if rows is not None and rows.is_cuda:
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)  # (B, D)
            host.copy_(rows, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
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
        if host is not None:
            block[(ids - start).numpy()] = host.numpy()
        self.dataset[start:start + count] = block

"""Files written whole or not at all.

Every file actindex writes (index, FAISS file, checkpoint, picture, page, maps) is written under a temporary
name beside its target, `.NAME.tmp-PID`, and renamed onto the target when complete: a reader, or a run that
crashed half-way, never sees half a file, and the temporary file is removed when writing fails. The PID keeps
processes that write the same file (the atlas's workers) apart. `durable` writes also survive a power cut: the
file is flushed to disk before the rename, and the folder after it.

Nothing here imports torch, so that commands which only read an index stay light.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s contents to; it becomes `path` when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes, durable: bool = False) -> None:
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

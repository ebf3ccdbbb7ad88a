"""Files that survive a crash or a power cut: flushing them to disk and committing a temporary file by rename.

Nothing here imports torch, so that commands which only read an index stay light.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a file's (or a folder's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it onto `path`, fsync the folder: after this returns, `path` survives a power cut."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_file(path.parent)

"""A build's partial state, kept beside the output so that a build that dies continues where it stopped.

    OUT.partial/
      manifest.json            what is being built (its fingerprint), the world size, every rank's shard
      rank-00003.safetensors   rank 3's top-k state tensors; next image id and skipped files as metadata
      rank-00003.rows          rank 3's embedding rows: float32, row i is image id shard_start + i
      rank-00003.patches       with --patch-layer, its patch rows: float16, H * W * C per image, same order
      rank-00003.lock          locked by rank 3's process while it runs; names its pid and host

A checkpoint commits the rows first (fsync), then the state file (temporary name, fsync, rename, fsync of
the folder), so a state file never counts rows that are not on disk; rows written after it are written
again on resume. Everything is plain tensors, JSON and raw floats: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from actindex.kernels.errors import UserError

from .atomic import atomic_path, atomic_write

CHECKPOINT_FORMAT = "actindex-partial-build"
CHECKPOINT_VERSION = 2  # 2: the state holds exact sums for the units' means

# How fingerprint keys are named in messages.
_LABELS = {"world_size": "processes (world size)", "images": "image list", "images_count": "number of images",
           "weights": "weights", "weights_sha256": "weights file contents", "layers": "layers", "k": "k",
           "bottom_k": "bottom-k", "input_size": "input size", "model": "model", "batch_size": "batch size",
           "mean": "mean", "std": "std", "embed_layer": "embedding layer", "max_pixels": "max pixels",
           "device_type": "device type", "embed_dim": "embedding size",
           "patch_layer": "patch layer", "patch_dim": "patch vector size per image"}


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def image_list_hash(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def differences(saved: dict[str, Any], current: dict[str, Any], where: tuple[str, str] = ("in the checkpoint", "now"),
                ) -> list[str]:
    """'k: 9 in the checkpoint, 5 now' for every key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(f"{_LABELS.get(key, key)}: {_short(saved.get(key))} {where[0]}, "
                       f"{_short(current.get(key))} {where[1]}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:12] + "…"


@dataclass
class PartialManifest:
    fingerprint: dict[str, Any]
    shards: list[tuple[int, int]]  # per rank, image ids [start, end)

    def save(self, folder: Path) -> None:
        record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint,
                  "shards": [list(s) for s in self.shards]}
        atomic_write(folder / "manifest.json", json.dumps(record, indent=1, sort_keys=True).encode(), durable=True)

    @classmethod
    def load(cls, folder: Path) -> PartialManifest:
        path = folder / "manifest.json"
        try:
            record = json.loads(path.read_bytes())
            fmt, version = record.get("format"), record.get("version")
        except (OSError, ValueError, AttributeError) as error:
            raise UserError(f"'{folder}' holds no readable partial build ({error}); move it away to start "
                            "over") from error
        if fmt != CHECKPOINT_FORMAT:
            raise UserError(f"'{folder}' is not an actindex partial build; move it away to start over")
        if version != CHECKPOINT_VERSION:
            raise UserError(f"'{folder}' is a partial build of checkpoint version {version}; this actindex "
                            f"resumes version {CHECKPOINT_VERSION}: finish it with the release that started it, "
                            "or delete the folder to start over")
        return cls(record["fingerprint"], [(int(a), int(b)) for a, b in record["shards"]])


@dataclass
class RankState:
    """One rank's progress through its shard [start, end)."""

    rank: int
    next_id: int  # images [start, next_id) are folded into `topk` and their rows are on disk
    end: int
    topk: dict[str, torch.Tensor]  # IndexAccumulator.state_dict()
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (image id, reason)

    @property
    def done(self) -> bool:
        return self.next_id >= self.end


def state_path(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.safetensors"


def save_state(folder: Path, state: RankState, fingerprint: str) -> None:
    metadata = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "fingerprint": fingerprint,
                "rank": str(state.rank), "next_id": str(state.next_id), "end": str(state.end),
                "skipped": json.dumps(state.skipped)}
    with atomic_path(state_path(folder, state.rank), durable=True) as tmp:
        save_file({key: t.contiguous() for key, t in state.topk.items()}, str(tmp), metadata=metadata)


def load_state(folder: Path, rank: int, fingerprint: str) -> RankState | None:
    """This rank's last checkpoint, or None if it never wrote one."""
    path = state_path(folder, rank)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (OSError, SafetensorError) as error:
        raise UserError(f"checkpoint '{path}' is unreadable ({error}); delete '{folder}' to start over") from error
    if metadata.get("format") != CHECKPOINT_FORMAT or metadata.get("version") != str(CHECKPOINT_VERSION):
        raise UserError(f"'{path}' is not a checkpoint this actindex reads; delete '{folder}' to start over")
    if metadata.get("fingerprint") != fingerprint or int(metadata["rank"]) != rank:
        raise UserError(f"'{path}' belongs to another build than '{folder / 'manifest.json'}'; delete "
                        f"'{folder}' to start over")
    skipped = [(int(i), str(reason)) for i, reason in json.loads(metadata["skipped"])]
    return RankState(rank, int(metadata["next_id"]), int(metadata["end"]), tensors, skipped)


def read_progress(folder: Path, shards: list[tuple[int, int]]) -> int:
    """Images checkpointed over all ranks (read from the state files' headers only)."""
    total = 0
    for rank, (start, _) in enumerate(shards):
        path = state_path(folder, rank)
        if path.exists():
            try:
                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata() or {}
            except (OSError, SafetensorError):
                continue
            total += int(metadata.get("next_id", start)) - start
    return total


def rows_path(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.rows"


def patch_rows_path(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.patches"


# -- who is using a partial build ------------------------------------------------------------------------------


def lock_path(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.lock"


class BuildLock:
    """One rank's exclusive claim on a partial build folder, held as long as its process lives.

    A POSIX record lock (`fcntl.lockf`) on `rank-NNNNN.lock`: the kernel drops it when the process ends,
    however it ends (SIGKILL included), processes forked from it (DataLoader workers) do not hold it, and on
    NFS it is the protocol's own lock (NLM, or NFSv4's), seen by every client. The file names its holder for
    the message another build gets.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self.fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, folder: Path, rank: int) -> BuildLock:
        """Lock rank `rank`'s slot of `folder` (creating the folder), or raise a UserError naming the holder."""
        path = lock_path(folder, rank)
        for _ in range(10):  # the folder may vanish under us: a build that just finished removes it
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue
            locked = _try_lock(fd)
            if locked is False:
                os.close(fd)
                raise UserError(in_use(folder, path))
            if not _same_file(fd, path):  # locked a file that was removed meanwhile: take the new one
                os.close(fd)
                continue
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            return cls(fd, path)
        raise UserError(f"cannot lock '{path}': the folder keeps disappearing; is another build finishing?")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops its POSIX lock
            self.fd = None


def check_unlocked(folder: Path, ranks: range) -> None:
    """Raise a UserError if a process holds any of these ranks' locks of `folder` (a build still running)."""
    for rank in ranks:
        path = lock_path(folder, rank)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            if _try_lock(fd) is False:
                raise UserError(in_use(folder, path))
        finally:
            os.close(fd)  # and with it the lock just taken to test


def in_use(folder: Path, path: Path) -> str:
    try:
        holder = json.loads(path.read_bytes())
        who = f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "its process is starting"
    return (f"another build ({who}) is using '{folder}'; wait for it to finish or stop it, then run this "
            "command again")


_UNSUPPORTED = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


def _try_lock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this filesystem has no locks (warned once)."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if error.errno in _UNSUPPORTED:
            warnings.warn(f"the filesystem of the partial build does not support locks ({error.strerror}): "
                          "a second build of the same --out would not be stopped", stacklevel=3)
            return None
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def has_checkpoints(folder: Path) -> bool:
    """Whether any rank has checkpointed work in `folder` (rows without a state file count for nothing)."""
    return any(folder.glob("rank-*.safetensors"))


def clear_partial(folder: Path, keep_locks: bool = True) -> None:
    """Remove a partial build's own files (never anything else that may be in the folder); the folder itself
    too when that leaves it empty and `keep_locks` is False."""
    patterns = ["manifest.json", ".manifest.json.tmp-*", "rank-*.safetensors", ".rank-*.safetensors.tmp-*",
                "rank-*.rows", "rank-*.patches"] + ([] if keep_locks else ["rank-*.lock"])
    for pattern in patterns:
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)
    if not keep_locks:
        with contextlib.suppress(OSError):  # something else is in it, or it is gone already
            folder.rmdir()

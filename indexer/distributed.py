"""One process among several: torchrun's environment, rank helpers that fall back to one process, and
coordination that never leaves a rank waiting on one that has failed.

torchrun starts one process per GPU and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. `start_job` joins the process group through the same env:// rendezvous `init_process_group`
uses (nccl for CUDA, gloo for CPU) and keeps the key-value store it returns. Collectives carry tensors (the
top-k gather); the store carries what no collective should wait on: each rank's progress, the first failure's
message, and the phase markers every rank sets before a collective runs. Waiting for a phase polls the
failure key, so an error on any rank ends every rank with that rank's message instead of a hang.

Without those variables, or with WORLD_SIZE=1, a `Job` is one process: rank 0 of 1, no store, nothing waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType
from typing import TypeVar

import torch
import torch.distributed as dist

from actindex.kernels.errors import Interrupted, UserError, one_line

from .devices import resolve_device
from .signals import describe

T = TypeVar("T")

_POLL_SECONDS = 0.05  # while waiting for the other ranks
_REPORT_SECONDS = 0.5  # between progress reports to the store while streaming
_FAILED = "failed"


class PeerFailed(UserError):
    """Another rank failed, or the job was stopped; `quiet` ranks leave printing the message to rank 0."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet

    def noted(self, note: str) -> PeerFailed:
        """The same error, its message extended by `note`."""
        self.args = (f"{self}{note}",)
        return self


class Stopped(PeerFailed, Interrupted):
    """This process was asked to stop (Ctrl-C, SIGTERM)."""

    def __init__(self, message: str, signum: int, quiet: bool = False) -> None:
        PeerFailed.__init__(self, message, quiet)
        self.exit_code = 128 + signum


@dataclass
class Job:
    """This process's place in the job. The defaults describe a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    store: dist.Store | None = None
    stop_signal: int | None = None  # SIGINT or SIGTERM received while streaming; acted on at the next batch
    streaming: bool = False  # while True a stopping signal waits for the batch boundary, else it stops at once
    _reported: tuple[int, int] = (0, 0)
    _unreported: list[int] = field(default_factory=lambda: [0, 0])
    _last_report: float = 0.0

    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str | None:
        if not self.distributed:
            return None
        return "nccl" if self.device.type == "cuda" else "gloo"

    # -- failures ------------------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        """Record this rank's failure where every rank looks; the first failure recorded wins."""
        if self.store is None or isinstance(error, PeerFailed):
            return
        record = json.dumps({"rank": self.rank, "host": socket.gethostname(), "message": one_line(error)})
        # The store may already be gone with the job; the error itself still ends this rank.
        with contextlib.suppress(Exception):
            self.store.compare_set(_FAILED, "", record)

    def check(self) -> None:
        """Raise if another rank has failed or this process was asked to stop."""
        if self.store is not None and self.store.check([_FAILED]):
            record = json.loads(self.store.get(_FAILED))
            raise PeerFailed(f"rank {record['rank']} ({record['host']}) failed: {record['message']}",
                             quiet=not self.is_main)
        if self.stop_signal is not None:
            raise Stopped(_stopped_by(self.stop_signal), self.stop_signal, quiet=not self.is_main)

    # -- phases --------------------------------------------------------------------------------------------

    def wait(self, phase: str, poll: Callable[[], None] | None = None) -> None:
        """Block until every rank has reached `phase`, calling `poll` meanwhile; raise as soon as any rank has
        failed."""
        if self.store is None:
            return
        self.store.add(f"phase/{phase}", 1)
        while int(self.store.add(f"phase/{phase}", 0)) < self.world_size:
            self.check()
            if poll is not None:
                poll()
            time.sleep(_POLL_SECONDS)
        self.check()

    def agree(self, phase: str, action: Callable[[], T]) -> T:
        """Run `action` on every rank and compare outcomes: if it failed anywhere, every rank raises, and only
        rank 0 prints (its own error, else the lowest failing rank's)."""
        try:
            result, error = action(), None
        except Exception as caught:  # noqa: BLE001 - re-raised below, on every rank
            result, error = None, caught
        if self.store is None:
            if error is not None:
                raise error
            return result  # type: ignore[return-value]
        self.store.set(f"agree/{phase}/{self.rank}", "" if error is None else one_line(error))
        keys = [f"agree/{phase}/{rank}" for rank in range(self.world_size)]
        while not self.store.check(keys):
            self.check()
            time.sleep(_POLL_SECONDS)
        failed = [(rank, message) for rank, key in enumerate(keys)
                  if (message := self.store.get(key).decode())]
        if not failed:
            return result  # type: ignore[return-value]
        if not self.is_main:
            raise PeerFailed(failed[0][1], quiet=True) from error
        if error is not None:
            raise error
        rank, message = failed[0]
        raise PeerFailed(f"rank {rank} failed: {message}")

    # -- progress ------------------------------------------------------------------------------------------

    def report(self, images: int, skipped: int) -> tuple[int, int] | None:
        """Count this rank's progress; every half second, publish it and return the job's totals
        (images, skipped) on rank 0. Also raises if another rank has failed."""
        self._unreported[0] += images
        self._unreported[1] += skipped
        now = time.monotonic()
        if self.store is None:
            total = self._reported[0] + self._unreported[0], self._reported[1] + self._unreported[1]
            self._reported, self._unreported = total, [0, 0]
            self.check()
            return total
        if now - self._last_report < _REPORT_SECONDS and not self.stop_requested:
            return None
        self._last_report = now
        done = int(self.store.add("progress/images", self._unreported[0]))
        bad = int(self.store.add("progress/skipped", self._unreported[1]))
        self._unreported = [0, 0]
        self.check()
        return (done, bad) if self.is_main else None

    def flush_report(self) -> tuple[int, int] | None:
        self._last_report = 0.0
        return self.report(0, 0)

    # -- collectives ---------------------------------------------------------------------------------------

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape and dtype on each) on rank 0, in rank order; None elsewhere."""
        if not self.distributed:
            return [tensor]
        received = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.is_main else None
        dist.gather(tensor, received, dst=0)
        return received

    def gather_state(self, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]] | None:
        """Every rank's named tensors (same names, shapes and dtypes on each) on rank 0, in rank order, on the
        CPU; None elsewhere. One collective per dtype: the tensors travel packed into one flat tensor each."""
        if not self.distributed:
            return [state]
        names = sorted(state)
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name in names:
            by_dtype.setdefault(state[name].dtype, []).append(name)
        gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world_size)]
        for group in by_dtype.values():
            flat = torch.cat([state[name].flatten() for name in group]).to(self.device)
            received = self.gather(flat)
            if received is None:
                continue
            for rank, packed in enumerate(received):
                parts = packed.cpu().split([state[name].numel() for name in group])
                gathered[rank].update({name: part.view(state[name].shape) for name, part in zip(group, parts,
                                                                                                  strict=True)})
        return gathered if self.is_main else None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@contextmanager
def start_job(requested_device: str | None, timeout: timedelta = timedelta(minutes=30)) -> Iterator[Job]:
    """Join the job torchrun started (or be the only process), and leave it cleanly.

    A stopping signal while images stream (Ctrl-C; SIGTERM from torchrun tearing the job down after another
    rank died, or from a scheduler cancelling it) sets `stop_signal`: the build checkpoints at the next batch
    boundary and stops with a message. A second one, or one at any other time, stops at once.
    """
    env = os.environ
    rank, world = (int(env["RANK"]), int(env["WORLD_SIZE"])) if launched_by_torchrun() else (0, 1)
    local_rank = int(env.get("LOCAL_RANK", "0"))
    job = Job(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world_size())
    job.device = resolve_device(requested_device, local_rank, world)
    if job.device.type == "cuda":
        torch.cuda.set_device(job.device)
    owns_group = False
    if world > 1:
        if dist.is_initialized():  # the caller set up the group; use its store
            store = dist.distributed_c10d._get_default_store()
        else:
            store, job.rank, job.world_size = next(dist.rendezvous("env://", timeout=timeout))
            store.set_timeout(timeout)
            dist.init_process_group(job.backend, store=dist.PrefixStore("default_pg", store), rank=job.rank,
                                    world_size=job.world_size, timeout=timeout,
                                    device_id=job.device if job.device.type == "cuda" else None)
            owns_group = True
        # torchrun's store outlives restarts of the workers: keep each attempt's keys apart.
        job.store = dist.PrefixStore(f"actindex/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    with _stop_on_signals(job):
        try:
            yield job
        finally:
            if owns_group:
                dist.destroy_process_group()


@contextmanager
def _stop_on_signals(job: Job) -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        if job.stop_signal is not None or not job.streaming:
            raise Stopped(_stopped_by(signum, again=job.stop_signal is not None), signum, quiet=not job.is_main)
        job.stop_signal = signum

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stopped_by(signum: int, again: bool = False) -> str:
    if again:
        return f"stopped at once by a second {describe(signum)}"
    if signum == signal.SIGTERM:
        return "stopped by SIGTERM (the job was cancelled, or another of its processes died)"
    return f"stopped by {describe(signum)}"

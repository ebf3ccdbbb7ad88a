"""`build_index`: stream an image folder through a network and write the per-unit top-k index.

One process, or every process of a torchrun job: plan (`plan.py`), prepare or resume the partial build
(`checkpoint.py`), stream this process's shard (`stream.py`), merge the ranks' top-k on rank 0, write the file
(`write.py`).
"""

from __future__ import annotations

import dataclasses
import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actindex.kernels.errors import UserError

from .accumulate import IndexAccumulator
from .checkpoint import (
    BuildLock,
    PartialManifest,
    RankState,
    check_unlocked,
    clear_partial,
    differences,
    fingerprint_hash,
    has_checkpoints,
    load_state,
    partial_dir,
    patch_rows_path,
    read_progress,
    rows_path,
    save_state,
)
from .distributed import Job, PeerFailed, start_job
from .plan import BuildConfig, BuildPlan, default_workers, fingerprint, plan_build, shard_ranges
from .rows import EMBEDDING, PATCHES, RowFile, RowSink
from .stream import Fault, InjectedFault, Progress, ProgressFactory, SilentProgress, shard_batches, stream
from .write import copy_row_files, write_index

__all__ = ["BuildConfig", "BuildSummary", "Fault", "InjectedFault", "build_index", "default_workers",
           "shard_ranges"]


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
    rank: int = 0
    world_size: int = 1
    resumed: int | None = None  # images taken from a checkpoint; None when --resume was not given
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # rank 0's seconds per stage
    faiss_note: str = ""  # when the similarity index's calibration missed its target: what it reached, what to do

    @property
    def images_per_second(self) -> float:
        """Images this run processed (not those taken from a checkpoint) per second, over all processes."""
        return (self.num_images - (self.resumed or 0)) / self.seconds if self.seconds > 0 else math.inf


def build_index(config: BuildConfig, progress: ProgressFactory | None = None, *,
                fault: Fault | None = None) -> BuildSummary:
    """Build the index described by `config`; the file appears at `config.out` only when complete.

    Run alone, or as every process of a torchrun job (each builds its shard, rank 0 writes the file). Work is
    checkpointed beside the output every `config.checkpoint_every` images; `config.resume` continues it.
    """
    with start_job(config.device) as job:
        plan = job.agree("plan", lambda: plan_build(config, job.device))
        return _Build(plan, job, progress, fault).run()


class _Build:
    """One process's part of a build: prepare or resume the partial folder, stream a shard, merge, write."""

    def __init__(self, plan: BuildPlan, job: Job, progress: ProgressFactory | None, fault: Fault | None) -> None:
        self.plan, self.job, self.fault = plan, job, fault
        self.config = plan.config
        self.progress = progress if (progress is not None and job.is_main) else (lambda total, done: SilentProgress())
        self.folder = partial_dir(self.config.out)
        self.fingerprint = fingerprint(plan, job.world_size)
        self.key = fingerprint_hash(self.fingerprint)
        self.shards = shard_ranges(len(plan.images.paths), self.config.batch_size, job.world_size)
        self.timings = {"stream": 0.0, "checkpoint": 0.0, "merge": 0.0, "write": 0.0, "faiss": 0.0}
        self._shown = (0, 0)  # the job's (images, skipped) the progress bar has been told about
        self.lock: BuildLock | None = None  # this rank's slot of the partial build, held while it runs
        self.faiss_note = ""

    def _show(self, bar: Progress, totals: tuple[int, int] | None) -> None:
        if totals is not None:
            bar.update(totals[0] - self._shown[0], totals[1] - self._shown[1])
            self._shown = totals

    def run(self) -> BuildSummary:
        try:
            return self._run()
        except BaseException:
            self._discard_if_empty()
            raise
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> BuildSummary:
        job, plan, config = self.job, self.plan, self.config
        started = time.perf_counter()
        resumed = job.agree("prepare", self._prepare if job.is_main else lambda: None)
        job.agree("join", self._join)
        start, end = self.shards[job.rank]
        state = (load_state(self.folder, job.rank, self.key) if config.resume else None) or \
            RankState(job.rank, start, end, {})
        accumulator = IndexAccumulator(plan.loaded.module, {n: g.channels for n, g in plan.geometry.items()},
                                       config.k, plan.mean, plan.std, plan.embed_layer, plan.device, plan.numerics,
                                       torch.tensor(plan.images.labels, dtype=torch.int64), len(plan.images.classes),
                                       config.bottom_k, plan.patch_grid.layer if plan.patch_grid else None)
        if state.topk:
            accumulator.load_state_dict(state.topk)
        rows: dict[str, RowFile | None] = {
            EMBEDDING: RowFile(rows_path(self.folder, job.rank), start, end, plan.embed_dim)
            if plan.embed_layer else None,
            PATCHES: RowFile(patch_rows_path(self.folder, job.rank), start, end, _patch_dim(plan), np.float16)
            if plan.patch_grid else None}
        bar = self.progress(len(plan.images.paths), resumed or 0)
        try:
            tick = time.perf_counter()
            job.streaming = True
            stream(shard_batches(plan, state.next_id, state.end), state, accumulator, RowSink(rows),
                   lambda: self._checkpoint(state, accumulator, rows), config.checkpoint_every, job,
                   lambda totals: self._show(bar, totals),
                   (self.fault, start) if self.fault is not None else None)
            self.timings["stream"] = time.perf_counter() - tick - self.timings["checkpoint"]
            job.wait("streamed", poll=lambda: self._show(bar, job.flush_report()))
            self._show(bar, job.flush_report())  # every rank published its count before reaching the phase
        except PeerFailed as stopped:
            raise stopped.noted(f"; the work done is checkpointed in '{self.folder}': rerun the same command "
                                "with --resume to continue") from None
        except Exception as error:
            job.fail(error)
            raise
        finally:
            job.streaming = False
            bar.close()
            for file in rows.values():
                if file is not None:
                    file.close()
        try:
            tick = time.perf_counter()
            self._merge(accumulator)
            self.timings["merge"] = time.perf_counter() - tick
            seconds = time.perf_counter() - started
            skipped = job.agree("write", lambda: self._write(accumulator, seconds) if job.is_main else 0)
        except PeerFailed as stopped:
            raise stopped.noted(f"; every image is checkpointed in '{self.folder}': rerun the same command with "
                                "--resume to write the index") from None
        if job.is_main:
            clear_partial(self.folder, keep_locks=False)
        n = len(plan.images.paths)
        return BuildSummary(config.out, n, n - skipped, skipped, seconds, tuple(plan.geometry), plan.embed_layer,
                            plan.device.type, job.rank, job.world_size, resumed, dict(self.timings), self.faiss_note)

    def _prepare(self) -> int | None:
        """Rank 0: lock the partial build, check it for resuming, or start a new one. Returns the images
        checkpointed (0 when --resume finds nothing to resume, None without --resume)."""
        folder, config = self.folder, self.config
        self.lock = BuildLock.acquire(folder, 0)
        manifest = PartialManifest.load(folder) if (folder / "manifest.json").exists() else None
        # A rank of an earlier job may still be running while its rank 0 is gone (a dead node).
        check_unlocked(folder, range(1, max(self.job.world_size, len(manifest.shards) if manifest else 0)))
        if manifest is not None and has_checkpoints(folder):
            done = read_progress(folder, manifest.shards)
            changed = differences(manifest.fingerprint, self.fingerprint)
            if config.resume and not changed:
                return done
            if config.resume:
                raise UserError(f"cannot resume from '{folder}': it was made with a different configuration "
                                f"({'; '.join(changed)}); rerun with the original settings to continue it, or "
                                "without --resume and with --overwrite to discard it and start over")
            if not config.overwrite:
                raise UserError(f"an unfinished build of '{config.out}' is in '{folder}' ({done} images "
                                "checkpointed); add --resume to continue it, or --overwrite to discard it and "
                                "start over")
        clear_partial(folder)  # nothing checkpointed, or --overwrite: nothing of value is lost
        PartialManifest(self.fingerprint, self.shards).save(folder)
        return 0 if config.resume else None

    def _join(self) -> None:
        """Every rank: lock its own slot (rank 0 did in `_prepare`), and read rank 0's manifest: several nodes
        need the output on a shared filesystem, and the same image list and weights everywhere."""
        if not self.job.is_main:
            if not self.folder.is_dir():
                raise UserError(f"rank {self.job.rank} on {socket.gethostname()} cannot see '{self.folder}' that "
                                "rank 0 wrote: with several nodes, --out must be on a filesystem all nodes share")
            self.lock = BuildLock.acquire(self.folder, self.job.rank)
        if not (self.folder / "manifest.json").exists():
            raise UserError(f"rank {self.job.rank} on {socket.gethostname()} cannot see '{self.folder}' that "
                            "rank 0 wrote: with several nodes, --out must be on a filesystem all nodes share")
        changed = differences(PartialManifest.load(self.folder).fingerprint, self.fingerprint, ("on rank 0", "here"))
        if changed:
            raise UserError(f"rank {self.job.rank} on {socket.gethostname()} does not see what rank 0 sees "
                            f"({'; '.join(changed)}); every node needs the same data folder, weights and options")

    def _discard_if_empty(self) -> None:
        """After a failure: a partial build this process locked, with nothing checkpointed, is removed, so that
        it does not stand in the way of the next command. Only one process can know that no rank is about to
        checkpoint; with several, the next build replaces such a folder instead."""
        if self.lock is None or not self.job.is_main or self.job.distributed or has_checkpoints(self.folder):
            return
        self.lock.release()
        self.lock = None
        clear_partial(self.folder, keep_locks=False)

    def _checkpoint(self, state: RankState, accumulator: IndexAccumulator, rows: dict[str, RowFile | None]) -> None:
        tick = time.perf_counter()
        for file in rows.values():
            if file is not None:
                file.sync()  # rows first: the state file must never count rows that are not on disk
        state.topk = accumulator.state_dict()
        save_state(self.folder, state, self.key)
        self.timings["checkpoint"] += time.perf_counter() - tick

    def _merge(self, accumulator: IndexAccumulator) -> None:
        """Gather every rank's top-k state on rank 0 and fold it in: exact, as the keys have no ties."""
        states = self.job.gather_state(accumulator.state_dict())
        for state in (states or [])[1:]:
            accumulator.merge_state(state)

    def _write(self, accumulator: IndexAccumulator, seconds: float) -> int:
        """Rank 0: the index file, embeddings copied from every rank's rows in id order. Returns skipped count."""
        tick = time.perf_counter()
        skipped: list[tuple[int, str]] = []
        for rank in range(self.job.world_size):
            state = load_state(self.folder, rank, self.key)
            if state is None or not state.done:
                raise UserError(f"rank {rank} did not finish its shard (no final checkpoint in '{self.folder}'); "
                                "rerun with --resume")
            skipped += state.skipped
        files = [(rows_path(self.folder, rank), start, end) for rank, (start, end) in enumerate(self.shards)]
        patch_files = [(patch_rows_path(self.folder, rank), start, end)
                       for rank, (start, end) in enumerate(self.shards)]
        self.timings["faiss"], self.faiss_note = write_index(
            self.plan, accumulator, skipped, {
                EMBEDDING: lambda dataset: copy_row_files(dataset, files, self.plan.embed_dim),
                PATCHES: lambda dataset: copy_row_files(dataset, patch_files, _patch_dim(self.plan), np.float16)},
            self.job.world_size, seconds)
        self.timings["write"] = time.perf_counter() - tick
        return len(skipped)


def _patch_dim(plan: BuildPlan) -> int:
    """Float16 values a patch row file holds per image: every position's channels."""
    return plan.patch_grid.positions * plan.patch_grid.channels if plan.patch_grid else 0

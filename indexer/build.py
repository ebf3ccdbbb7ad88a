"""`build_index`: stream an image folder through a network and write the per-unit top-k index."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import torch

from actindex.kernels.errors import UserError, not_found
from actindex.kernels.receptive_field import LayerGeometry, boxes
from actindex.kernels.spatial import unravel
from actindex.kernels.topk import TopKResult

from .accumulate import IndexAccumulator
from .atomic import atomic_path
from .checkpoint import (
    BuildLock,
    Manifest,
    RankState,
    RowFile,
    check_unlocked,
    clear_partial,
    differences,
    fingerprint_hash,
    has_checkpoints,
    image_list_hash,
    load_state,
    partial_dir,
    read_progress,
    rows_path,
    save_state,
)
from .distributed import Job, PeerFailed, local_world_size, start_job
from .images import DEFAULT_MAX_PIXELS, ImageDataset, ImageList, scan_folder
from .index_file import IndexWriter, LayerHits, check_output
from .layers import addressable_layers, check_indexable, resolve_layers
from .models import LoadedModel, load_model
from .signals import detach_worker, shielded
from .similarity import NONE, check_factory, index_for, vector_index_path, write_vector_index


class Progress(Protocol):
    """What the build reports as it goes; the CLI plugs in a tqdm bar, the library default is silent."""

    def update(self, images: int, skipped: int) -> None:
        """`images` more images were handled, `skipped` of them could not be read."""

    def close(self) -> None: ...


ProgressFactory = Callable[[int, int], Progress]  # called with the number of images and those already done


class _Silent:
    def update(self, images: int, skipped: int) -> None:
        pass

    def close(self) -> None:
        pass


DEFAULT_CHECKPOINT_EVERY = 50_000  # images per process: a minute or two of a GPU's work


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
    workers: int | None = None  # decoding processes; None: this node's cores shared among its processes, <= 8
    device: str | None = None  # None: cuda when present, else cpu; under torchrun cuda:LOCAL_RANK
    embed_layer: str | None = None  # None: the last indexed layer; "" for none
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # images per process between checkpoints; 0: never
    resume: bool = False  # continue the partial build beside `out`, if there is one
    faiss_factory: str | None = None  # None: chosen by the data's size; "none": no FAISS file


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

    @property
    def images_per_second(self) -> float:
        """Images this run processed (not those taken from a checkpoint) per second, over all processes."""
        return (self.num_images - (self.resumed or 0)) / self.seconds if self.seconds > 0 else math.inf


@dataclass(frozen=True)
class Fault:
    """A failure injected on purpose, for tests: on `rank`, after `after` images of its shard, `how` happens:
    "raise" an exception or "kill" the process with SIGKILL."""

    rank: int
    after: int
    how: str = "raise"

    @classmethod
    def parse(cls, text: str) -> Fault:
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("raise", "kill")):
            raise UserError(f"--crash-at takes RANK:IMAGES[:raise|kill], got '{text}'")
        return cls(int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else "raise")

    def strike(self, rank: int, done: int) -> None:
        if rank != self.rank or done < self.after:
            return
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected fault on rank {rank} after {done} images")


class InjectedFault(RuntimeError):
    pass


def validate(config: BuildConfig) -> None:
    """Checks that need no model or data, done before any work."""
    if config.k < 1:
        raise UserError(f"--k must be at least 1, got {config.k}")
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


@dataclass
class _Plan:
    """What a build resolved before streaming: the model, its layers and the image list."""

    config: BuildConfig
    loaded: LoadedModel
    geometry: dict[str, LayerGeometry]
    embed_layer: str | None
    embed_dim: int
    images: ImageList
    device: torch.device
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def default_workers() -> int:
    """Decoding processes per process of the job: the cores this process may use, shared among the job's
    processes on this node, at most 8 (DataLoader warns beyond the cores, and gains little beyond 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // local_world_size()))


def plan_build(config: BuildConfig, device: torch.device) -> _Plan:
    validate(config)
    if config.workers is None:
        config = dataclasses.replace(config, workers=default_workers())
    images = scan_folder(config.data)
    if len(images.paths) >= 2**32:
        raise UserError("more than 2**32 images; split the folder")
    loaded = load_model(config.model, config.weights, device)
    geometry = resolve_layers(loaded.module, config.layers, config.input_size, device)
    embed_layer = _embed_layer(config, loaded, list(geometry))
    mean = tuple(config.mean or loaded.mean)
    std = tuple(config.std or loaded.std)
    plan = _Plan(config, loaded, geometry, embed_layer, 0, images, device, mean, std)  # type: ignore[arg-type]
    plan.embed_dim = _embedding_dim(plan) if embed_layer is not None else 0
    if config.faiss_factory not in (None, NONE) and embed_layer is not None:
        check_factory(config.faiss_factory, plan.embed_dim)
    return plan


def _embed_layer(config: BuildConfig, loaded: LoadedModel, layers: list[str]) -> str | None:
    if config.embed_layer == "":
        return None
    if config.embed_layer is None:
        return layers[-1]
    names = addressable_layers(loaded.module)
    if config.embed_layer not in names:
        raise not_found("layer", config.embed_layer, names, hint="for --embed-layer")
    return config.embed_layer


def shard_ranges(n: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous id ranges, one per rank, cut at batch boundaries.

    Cutting whole batches (`batches * rank // world`) means every batch any rank runs is exactly a batch of
    the single-process build, so each image's activations are computed in the same company and the index is
    the same bit for bit whatever the number of processes. Ranks differ by at most one batch.
    """
    batches = -(-n // batch_size)
    cuts = [min(batches * rank // world_size * batch_size, n) for rank in range(world_size + 1)]
    return list(itertools.pairwise(cuts))


def fingerprint(plan: _Plan, world_size: int) -> dict[str, object]:
    """What a checkpoint must agree on to be resumed: everything that changes the index or the shards."""
    config = plan.config
    return {"model": config.model, "weights": plan.loaded.weights, "weights_sha256": plan.loaded.weights_sha256,
            "layers": list(plan.geometry), "k": config.k, "input_size": config.input_size, "mean": list(plan.mean),
            "std": list(plan.std), "embed_layer": plan.embed_layer, "embed_dim": plan.embed_dim,
            "max_pixels": config.max_pixels, "batch_size": config.batch_size, "world_size": world_size,
            "device_type": plan.device.type, "images_count": len(plan.images.paths),
            "images": image_list_hash(plan.images.paths)}


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

    def __init__(self, plan: _Plan, job: Job, progress: ProgressFactory | None, fault: Fault | None) -> None:
        self.plan, self.job, self.fault = plan, job, fault
        self.config = plan.config
        self.progress = progress if (progress is not None and job.is_main) else (lambda total, done: _Silent())
        self.folder = partial_dir(self.config.out)
        self.fingerprint = fingerprint(plan, job.world_size)
        self.key = fingerprint_hash(self.fingerprint)
        self.shards = shard_ranges(len(plan.images.paths), self.config.batch_size, job.world_size)
        self.timings = {"stream": 0.0, "checkpoint": 0.0, "merge": 0.0, "write": 0.0, "faiss": 0.0}
        self._shown = (0, 0)  # the job's (images, skipped) the progress bar has been told about
        self.lock: BuildLock | None = None  # this rank's slot of the partial build, held while it runs

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
                                       config.k, plan.mean, plan.std, plan.embed_layer, plan.device)
        if state.topk:
            accumulator.load_state_dict(state.topk)
        rows = RowFile(rows_path(self.folder, job.rank), start, end, plan.embed_dim) if plan.embed_layer else None
        bar = self.progress(len(plan.images.paths), resumed or 0)
        try:
            tick = time.perf_counter()
            job.streaming = True
            self._stream(state, accumulator, rows, bar)
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
            if rows is not None:
                rows.close()
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
                            plan.device.type, job.rank, job.world_size, resumed, dict(self.timings))

    def _prepare(self) -> int | None:
        """Rank 0: lock the partial build, check it for resuming, or start a new one. Returns the images
        checkpointed (0 when --resume finds nothing to resume, None without --resume)."""
        folder, config = self.folder, self.config
        self.lock = BuildLock.acquire(folder, 0)
        manifest = Manifest.load(folder) if (folder / "manifest.json").exists() else None
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
        Manifest(self.fingerprint, self.shards).save(folder)
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
        changed = differences(Manifest.load(self.folder).fingerprint, self.fingerprint, ("on rank 0", "here"))
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

    def _checkpoint(self, state: RankState, accumulator: IndexAccumulator, rows: RowFile | None) -> None:
        tick = time.perf_counter()
        if rows is not None:
            rows.sync()  # rows first: the state file must never count rows that are not on disk
        state.topk = accumulator.state_dict()
        save_state(self.folder, state, self.key)
        self.timings["checkpoint"] += time.perf_counter() - tick

    def _stream(self, state: RankState, accumulator: IndexAccumulator, rows: RowFile | None,
                bar: Progress) -> None:
        """Feed this rank's shard from `state.next_id` through the accumulator in id order, checkpointing."""
        config, plan, job = self.config, self.plan, self.job
        shard_start = self.shards[job.rank][0]
        paths = plan.images.paths[state.next_id:state.end]
        dataset = ImageDataset(plan.images.root, paths, range(state.next_id, state.end), config.input_size,
                               config.max_pixels)
        workers = (config.workers or 0) if paths else 0
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                                             num_workers=workers, collate_fn=dataset.collate_fn,
                                             pin_memory=plan.device.type == "cuda",
                                             prefetch_factor=4 if workers > 0 else None,
                                             worker_init_fn=detach_worker if workers > 0 else None)
        with shielded():  # Ctrl-C and torchrun's signals are for this process, which stops its workers
            batches = iter(loader)
        sink = RowSink(rows)
        since_checkpoint = 0
        for batch in batches:  # batches come in id order: this one covers ids [state.next_id, + count)
            count = batch.ids.numel() + len(batch.skipped)
            sink.push(state.next_id, count, batch.ids, accumulator.add_batch(batch.pixels, batch.ids))
            state.skipped += batch.skipped
            state.next_id += count
            since_checkpoint += count
            if self.fault is not None:
                self.fault.strike(job.rank, state.next_id - shard_start)
            due = config.checkpoint_every and since_checkpoint >= config.checkpoint_every
            if due or job.stop_requested:
                sink.flush()
                self._checkpoint(state, accumulator, rows)
                since_checkpoint = 0
            try:
                totals = job.report(count, len(batch.skipped))
            except PeerFailed:
                if since_checkpoint:  # another rank failed: keep this rank's work before stopping
                    sink.flush()
                    self._checkpoint(state, accumulator, rows)
                raise
            self._show(bar, totals)
        sink.flush()
        self._checkpoint(state, accumulator, rows)  # the shard is done: the final record rank 0 reads
        self._show(bar, job.flush_report())

    def _merge(self, accumulator: IndexAccumulator) -> None:
        """Gather every rank's top-k state on rank 0 and fold it in: exact, as the keys have no ties."""
        values, integers = accumulator.flat_state()
        all_values, all_integers = self.job.gather(values), self.job.gather(integers)
        if all_values is not None and all_integers is not None:
            for rank in range(1, self.job.world_size):
                accumulator.merge_flat(all_values[rank], all_integers[rank])

    def _write(self, accumulator: IndexAccumulator, seconds: float) -> int:
        """Rank 0: the index file, embeddings copied from every rank's rows in id order. Returns skipped count."""
        tick = time.perf_counter()
        plan, config = self.plan, self.config
        states = [load_state(self.folder, rank, self.key) for rank in range(self.job.world_size)]
        skipped: list[tuple[int, str]] = []
        for rank, state in enumerate(states):
            if state is None or not state.done:
                raise UserError(f"rank {rank} did not finish its shard (no final checkpoint in '{self.folder}'); "
                                "rerun with --resume")
            skipped += state.skipped
        check_output(config.out, config.overwrite)
        with atomic_path(config.out, durable=True) as tmp:
            vectors = None
            with h5py.File(tmp, "w") as h5:
                writer = IndexWriter(h5)
                writer.write_images(plan.images.paths, plan.images.labels, plan.images.classes)
                means = accumulator.means(len(plan.images.paths) - len(skipped))
                for name, result in accumulator.results().items():
                    writer.write_layer(layer_hits(plan.geometry[name], result, config.input_size))
                    writer.write_mean(name, means[name].numpy())
                writer.write_skipped([(plan.images.paths[i], reason) for i, reason in skipped])
                attrs = _attrs(plan, self.job.world_size, len(skipped), seconds)
                if plan.embed_layer is not None:
                    embeddings = writer.create_embeddings(plan.embed_layer, len(plan.images.paths), plan.embed_dim)
                    self._copy_rows(embeddings)
                    if config.faiss_factory != NONE and len(skipped) < len(plan.images.paths):
                        tick_faiss = time.perf_counter()
                        vectors, faiss_attrs = index_for(embeddings, config.out, config.faiss_factory)
                        attrs.update(faiss_attrs)
                        self.timings["faiss"] = time.perf_counter() - tick_faiss
                writer.write_attrs(attrs)
            if vectors is not None:  # before the HDF5 file appears: it never names a missing FAISS file
                write_vector_index(vectors, vector_index_path(config.out))
        self.timings["write"] = time.perf_counter() - tick
        return len(skipped)

    def _copy_rows(self, dataset: h5py.Dataset) -> None:
        """Every rank's row file into the (N, D) dataset, a few MiB at a time: memory stays bounded."""
        step = max(1, (32 << 20) // (4 * max(self.plan.embed_dim, 1)))
        for rank, (start, end) in enumerate(self.shards):
            rows = RowFile(rows_path(self.folder, rank), start, end, self.plan.embed_dim)
            try:
                for a in range(start, end, step):
                    b = min(a + step, end)
                    dataset[a:b] = rows.read(a, b)
            finally:
                rows.close()


def _embedding_dim(plan: _Plan) -> int:
    if plan.embed_layer in plan.geometry:
        return plan.geometry[plan.embed_layer].channels
    from actindex.kernels.receptive_field import trace_geometry

    assert plan.embed_layer is not None
    geometry = trace_geometry(plan.loaded.module, plan.config.input_size, [plan.embed_layer], device=plan.device)
    if plan.embed_layer not in geometry:
        raise UserError(f"--embed-layer '{plan.embed_layer}' does not run in the forward pass; choose another")
    check_indexable(geometry[plan.embed_layer], role="--embed-layer")
    return geometry[plan.embed_layer].channels


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


def _attrs(plan: _Plan, world_size: int, skipped: int, seconds: float) -> dict[str, object]:
    from importlib.metadata import version

    config = plan.config
    record = {key: (str(value) if isinstance(value, Path) else value)
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
        "data_root": str(Path(config.data).resolve()), "num_images": n, "num_skipped": skipped,
        "layers": json.dumps(list(plan.geometry)), "embed_layer": plan.embed_layer or "",
        "categories": json.dumps(plan.loaded.categories), "config": json.dumps(record, sort_keys=True),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else 0.0, "device": plan.device.type,
        "world_size": world_size,
        "actindex_version": version("actindex"), "torch_version": str(torch.__version__),
    }

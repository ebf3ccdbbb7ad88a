"""One process's shard through the network: an iterator of batches in, the accumulator out, with the checkpoint
policy beside it; and what the stream reports as it goes (progress) or is made to suffer (faults, for tests).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from actindex.kernels.errors import UserError

from .accumulate import IndexAccumulator
from .checkpoint import RankState
from .choices import Decoder
from .distributed import Job, PeerFailed
from .loader import Batch, DeviceDecode, ImageDataset
from .plan import BuildPlan
from .rows import RowSink
from .signals import detach_worker, shielded


class Progress(Protocol):
    """What the build reports as it goes; the CLI plugs in a tqdm bar, the library default is silent."""

    def update(self, images: int, skipped: int) -> None:
        """`images` more images were handled, `skipped` of them could not be read."""

    def close(self) -> None: ...


ProgressFactory = Callable[[int, int], Progress]  # called with the number of images and those already done


class SilentProgress:
    """The library's default: no output."""

    def update(self, images: int, skipped: int) -> None:
        pass

    def close(self) -> None:
        pass


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


def shard_batches(plan: BuildPlan, start: int, end: int) -> Iterator[Batch]:
    """The images with ids [start, end), decoded and cropped by DataLoader workers, in batches in id order."""
    config = plan.config
    paths = plan.images.paths[start:end]
    dataset = ImageDataset(plan.images.root, paths, range(start, end), config.input_size, config.max_pixels,
                           config.decoder)
    workers = (config.workers or 0) if paths else 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=dataset.collate_fn, pin_memory=plan.device.type == "cuda",
                                         prefetch_factor=4 if workers > 0 else None,
                                         worker_init_fn=detach_worker if workers > 0 else None)
    with shielded():  # Ctrl-C and torchrun's signals are for this process, which stops its workers
        batches = iter(loader)
    if config.decoder is Decoder.GPU:
        return map(DeviceDecode(plan.device, config.max_pixels), batches)
    return batches


def stream(batches: Iterator[Batch], state: RankState, accumulator: IndexAccumulator, sink: RowSink,
           save: Callable[[], None], every: int, job: Job, show: Callable[[tuple[int, int] | None], None],
           fault: tuple[Fault, int] | None = None) -> None:
    """Fold `batches` (ids from `state.next_id` on, in order) into `accumulator` and their rows into `sink`,
    advancing `state`. `save()` checkpoints (after the sink is flushed): every `every` images (0: never on the
    way), when the job is asked to stop, before leaving because another rank failed, and at the end. `fault`:
    a fault to inject, and the first id of the shard it counts images from."""
    since = 0
    for batch in batches:  # this batch covers ids [state.next_id, + count)
        count = batch.ids.numel() + len(batch.skipped)
        sink.push(state.next_id, count, batch.ids, accumulator.add_batch(batch.pixels, batch.ids))
        state.skipped += batch.skipped
        state.next_id += count
        since += count
        if fault is not None:
            fault[0].strike(job.rank, state.next_id - fault[1])
        if (every and since >= every) or job.stop_requested:
            sink.flush()
            save()
            since = 0
        try:
            totals = job.report(count, len(batch.skipped))
        except PeerFailed:
            if since:  # another rank failed: keep this rank's work before stopping
                sink.flush()
                save()
            raise
        show(totals)
    sink.flush()
    save()  # the shard is done: the final record rank 0 reads
    show(job.flush_report())

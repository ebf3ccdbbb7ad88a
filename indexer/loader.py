"""The DataLoader side of a build: `ImageDataset` decodes one file in a worker (or reads its bytes, for the device
decoder), `collate` makes a `Batch` that carries each image's outcome, loaded or skipped with a reason, and
`DeviceDecode` finishes a batch's JPEG bytes on the device in the main process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import jpeg
from .decode import Decoder, Encoded, network_input, resize_crop, worker_input
from .images import ImageReadError

Item = tuple[int, torch.Tensor | Encoded | None, str]  # (image id, (3, S, S) uint8 or bytes or None, skip reason)


class ImageDataset(torch.utils.data.Dataset):
    """Image `ids[i]` is the file `root / paths[i]`: a shard passes its slice of both lists.

    A file that fails yields (id, None, reason) instead of raising, so a DataLoader worker never dies
    on bad data and the caller can record exactly which ids were skipped and why.
    """

    def __init__(self, root: Path, paths: Sequence[str], ids: Sequence[int], input_size: int, max_pixels: int,
                 decoder: Decoder = Decoder.PIL) -> None:
        if len(paths) != len(ids):
            raise ValueError(f"paths and ids must be parallel, got {len(paths)} paths and {len(ids)} ids")
        self.root = Path(root)
        self.paths = list(paths)
        self.ids = [int(i) for i in ids]
        self.input_size = input_size
        self.max_pixels = max_pixels
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Item:
        try:
            return self.ids[i], worker_input(self.root / self.paths[i], self.input_size, self.max_pixels,
                                             self.decoder), ""
        except ImageReadError as err:
            return self.ids[i], None, err.reason

    @property
    def collate_fn(self) -> _Collate:
        """`collate` that knows S, so a batch where every image failed still has shape (0, 3, S, S)."""
        return _Collate(self.input_size)


@dataclass
class Batch:
    """What the device loop needs from a batch: the images that loaded, and the ids that did not."""

    ids: torch.Tensor  # (B,) int64, in input order
    pixels: torch.Tensor  # (B, 3, S, S) uint8
    skipped: list[tuple[int, str]]  # (image id, reason)
    encoded: list[tuple[int, Encoded]] = field(default_factory=list)  # JPEG bytes left for `DeviceDecode`

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) calls this; without it a dataclass batch would stay pageable."""
        return Batch(self.ids.pin_memory(), self.pixels.pin_memory(), self.skipped, self.encoded)


def collate(items: Sequence[Item], input_size: int | None = None) -> Batch:
    """Stack the loaded images of a batch and list the failed ones (and the encoded ones, apart).

    When no image of the batch loaded, the items do not say what S is: pixels is then (0, 3, S, S) with
    `input_size`, and (0, 3, 0, 0) without it. Either is an empty batch to skip, never an error that
    would end a long run; pass `ImageDataset.collate_fn` to the DataLoader to always get S.
    """
    loaded = [(i, x) for i, x, _ in items if isinstance(x, torch.Tensor)]
    encoded = [(i, x) for i, x, _ in items if isinstance(x, Encoded)]
    skipped = [(i, reason) for i, x, reason in items if x is None]
    ids = torch.tensor([i for i, _ in loaded], dtype=torch.int64)  # (B,)
    if loaded:
        pixels = torch.stack([x for _, x in loaded])  # B x (3, S, S) -> (B, 3, S, S)
    else:
        side = input_size or 0
        pixels = torch.empty((0, 3, side, side), dtype=torch.uint8)
    return Batch(ids=ids, pixels=pixels, skipped=skipped, encoded=encoded)


@dataclass(frozen=True)
class _Collate:
    """A picklable `collate` bound to S, for DataLoader workers (a lambda would not pickle)."""

    input_size: int

    def __call__(self, items: Sequence[Item]) -> Batch:
        return collate(items, self.input_size)


class DeviceDecode:
    """Decode a batch's JPEG bytes on `device` in one call, resize and crop there, and merge them with the batch's
    CPU-decoded images in id order; the result's pixels are on `device`.

    When the batch call fails (one bad file fails it), each file is decoded alone; a file the device cannot
    decode, or decodes to another size than its header said, takes the CPU path here (`network_input`), and one
    that fails there too is skipped with that path's reason.
    """

    def __init__(self, device: torch.device | str, max_pixels: int) -> None:
        self.device = torch.device(device)
        self.max_pixels = max_pixels

    def __call__(self, batch: Batch) -> Batch:
        if not batch.encoded:
            return batch
        images = self._decode([item.data for _, item in batch.encoded])
        ids, pixels, skipped = batch.ids.tolist(), [batch.pixels.to(self.device)], list(batch.skipped)
        for (image_id, item), decoded in zip(batch.encoded, images, strict=True):
            g = item.geometry
            if decoded is not None and tuple(decoded.shape) == (3, g.height, g.width):
                x = resize_crop(decoded, g)
            else:
                try:
                    x = network_input(item.path, g.input_size, self.max_pixels, Decoder.TURBO).to(self.device)
                except ImageReadError as err:
                    skipped.append((image_id, err.reason))
                    continue
            ids.append(image_id)
            pixels.append(x.unsqueeze(0))  # (1, 3, S, S)
        order = torch.argsort(torch.tensor(ids, dtype=torch.int64))  # ids stay on the host, as the rows need them
        return Batch(torch.tensor(ids, dtype=torch.int64)[order], torch.cat(pixels)[order.to(self.device)],
                     sorted(skipped))

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:
            return list(jpeg.decode_jpeg(data, self.device))
        except (RuntimeError, ValueError):
            pass  # one bad file fails the batch: find it
        out: list[torch.Tensor | None] = []
        for item in data:
            try:
                decoded = jpeg.decode_jpeg(item, self.device)
                out.append(decoded if isinstance(decoded, torch.Tensor) else None)
            except (RuntimeError, ValueError):
                out.append(None)
        return out

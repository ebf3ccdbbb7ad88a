"""One forward pass per batch in, per-layer top-k and per-image activation vectors out.

`IndexAccumulator.add_batch` runs the network on a batch whose image ids are known, taps the chosen layers
while the forward runs, and folds each layer's per-image channel maxima into a `RunningTopK` on the model's
device. It knows nothing about where batches come from (a folder, a rank's shard, a benchmark's tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from actindex.kernels.spatial import spatial_max, spatial_mean
from actindex.kernels.topk import RunningTopK, TopKResult

from .taps import tapped


class IndexAccumulator:
    """Per-layer running top-k over images; state is O(layers × C × k) whatever the number of images."""

    def __init__(self, model: nn.Module, channels: dict[str, int], k: int, mean: Sequence[float],
                 std: Sequence[float], embed_layer: str | None, device: torch.device) -> None:
        self.model = model
        self.layers = list(channels)
        self.embed_layer = embed_layer
        self.device = device
        self.topk = {name: RunningTopK(c, k, device) for name, c in channels.items()}
        self._mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self._ids = torch.empty(0, dtype=torch.int64, device=device)
        self._embedding: torch.Tensor | None = None
        self.images_seen = 0

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 on any device -> normalized float32 on the model's device."""
        x = pixels.to(self.device, non_blocking=True).float().div_(255.0)
        return x.sub_(self._mean).div_(self._std)

    def _record(self, name: str, output: torch.Tensor) -> None:
        # Runs inside the forward hook: reduce now, before any in-place op downstream rewrites `output`.
        if name in self.topk:
            values, positions = spatial_max(output)  # (B, C), (B, C)
            self.topk[name].add(values, self._ids, positions)
        if name == self.embed_layer:
            self._embedding = spatial_mean(output)  # (B, D)

    @torch.inference_mode()
    def add_batch(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """Index one batch: pixels (B, 3, H, W) uint8, ids (B,) int64 global image ids, increasing.

        Returns the batch's (B, D) embedding on the device, or None without an embedding layer.
        """
        if ids.numel() == 0:
            return None
        if self.device.type == "cuda" and not ids.is_pinned():
            ids = ids.pin_memory()  # a copy from pageable memory would wait for the whole queue
        self._ids = ids.to(self.device, non_blocking=True)
        self._embedding = None
        names = self.layers + ([self.embed_layer] if self.embed_layer and self.embed_layer not in self.topk else [])
        with tapped(self.model, names, self._record) as taps:
            self.model(self.normalize(pixels))
            taps.check_once()
        self.images_seen += int(ids.numel())
        return self._embedding

    def merge(self, other: IndexAccumulator) -> None:
        for name, topk in self.topk.items():
            topk.merge(other.topk[name])
        self.images_seen += other.images_seen

    def flat_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's top-k state in two flat tensors on the device, for one collective each:
        float32 values (sum of C·k) and int64 ids then positions (2 · sum of C·k)."""
        states = [topk.state() for topk in self.topk.values()]
        values = torch.cat([v.flatten() for v, _, _ in states])
        integers = torch.cat([i.flatten() for _, i, _ in states] + [p.flatten() for _, _, p in states])
        return values, integers

    def merge_flat(self, values: torch.Tensor, integers: torch.Tensor) -> None:
        """Fold in another accumulator's `flat_state()` (disjoint images); exact."""
        ids, positions = integers.chunk(2)
        offset = 0
        for topk in self.topk.values():
            size = topk.channels * topk.k
            other = RunningTopK(topk.channels, topk.k, topk.device)
            other.load_state_dict({name: t[offset:offset + size].view(topk.channels, topk.k) for name, t in
                                   (("values", values), ("ids", ids), ("positions", positions))})
            topk.merge(other)
            offset += size

    def results(self) -> dict[str, TopKResult]:
        return {name: topk.result() for name, topk in self.topk.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}/{key}": tensor for name, topk in self.topk.items()
                for key, tensor in topk.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, topk in self.topk.items():
            topk.load_state_dict({key: state[f"{name}/{key}"] for key in ("values", "ids", "positions")})

"""One forward pass per batch in, per-layer top-k and per-image activation vectors (and patch vectors) out.

`IndexAccumulator.add_batch` runs the network on a batch whose image ids are known, taps the chosen layers
while the forward runs, and folds each layer's per-image channel maxima into a `RunningTopK`, an `ExactSum` (for
each unit's dataset mean) and a `UnitHistogram` (its score distribution: firing rate, quantiles) on the model's
device, and, on request, its channel minima into a second `RunningTopK` (the lowest responses). It knows nothing
about where batches come from (a folder, a rank's shard, a benchmark's tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from actindex.kernels.class_sums import ClassSums
from actindex.kernels.exact_sum import ExactSum
from actindex.kernels.histogram import UnitHistogram
from actindex.kernels.spatial import spatial_max, spatial_mean, spatial_min
from actindex.kernels.topk import RunningTopK, TopKResult

from .images import Normalize
from .precision import EXACT, Numerics
from .rows import EMBEDDING, PATCHES
from .taps import tapped


class IndexAccumulator:
    """Per-layer running top-k, exact sums and histograms over images; state is O(layers × C × (k + 277 + 5126))
    whatever the number of images (41 KB a unit, most of it the histogram); `bottom_k` = k' > 0 adds k' entries a
    unit, as many bytes as a top-k of k'."""

    def __init__(self, model: nn.Module, channels: dict[str, int], k: int, mean: Sequence[float],
                 std: Sequence[float], embed_layer: str | None, device: torch.device,
                 numerics: Numerics = EXACT, labels: torch.Tensor | None = None, classes: int = 0,
                 bottom_k: int = 0, patch_layer: str | None = None) -> None:
        """`labels` (N,) int64: each image id's class in [0, classes), for per-class means (None: no classes).
        `bottom_k` > 0 also keeps each unit's `bottom_k` images with the lowest minimum over positions.
        `patch_layer`: a layer whose (C, H, W) output is also returned whole, as every position's vector."""
        self.model = numerics.prepare(model)
        self.numerics = numerics
        self.layers = list(channels)
        self.embed_layer = embed_layer
        self.patch_layer = patch_layer
        self.device = device
        self.topk = {name: RunningTopK(c, k, device) for name, c in channels.items()}
        # The lowest minima are the highest negated minima: the top-k's exact merge and tie-break (equal values
        # to the lower id, -0.0 equal to +0.0) carry over, and negating back restores each value bit for bit.
        self.bottom = {name: RunningTopK(c, bottom_k, device) for name, c in channels.items()} if bottom_k else {}
        self.sums = {name: ExactSum(c, device) for name, c in channels.items()}
        self.distributions = {name: UnitHistogram(c, device) for name, c in channels.items()}
        self.labels = labels.to(device) if labels is not None and classes > 0 else None
        self.by_class = {name: ClassSums(classes, c, device) for name, c in channels.items()} \
            if self.labels is not None else {}
        self.normalize = Normalize(mean, std, device)
        self._ids = torch.empty(0, dtype=torch.int64, device=device)
        self._rows: dict[str, torch.Tensor] = {}

    def _record(self, name: str, output: torch.Tensor) -> None:
        # Runs inside the forward hook: reduce now, before any in-place op downstream rewrites `output`.
        if name in self.topk:
            values, positions = spatial_max(output)  # (B, C), (B, C)
            self.topk[name].add(values, self._ids, positions)
            self.sums[name].add(values)
            self.distributions[name].add(values)
            if self.labels is not None:
                self.by_class[name].add(values, self.labels[self._ids])
            if name in self.bottom:
                lows, low_positions = spatial_min(output)  # (B, C), (B, C)
                self.bottom[name].add(-lows, self._ids, low_positions)
        if name == self.embed_layer:
            self._rows[EMBEDDING] = spatial_mean(output)  # (B, D) float32
        if name == self.patch_layer:
            self._rows[PATCHES] = patch_rows(output)  # (B, H * W * C) float16

    @torch.inference_mode()
    def add_batch(self, pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Index one batch: pixels (B, 3, H, W) uint8, ids (B,) int64 global image ids, increasing.

        Returns the batch's rows on the device: the (B, D) embedding under `rows.EMBEDDING` and the (B, H * W * C)
        patch vectors under `rows.PATCHES`, each only when its layer is set (`rows.RowSink` takes them).
        """
        if ids.numel() == 0:
            return {}
        if self.device.type == "cuda" and not ids.is_pinned():
            ids = ids.pin_memory()  # a copy from pageable memory would wait for the whole queue
        self._ids = ids.to(self.device, non_blocking=True)
        self._rows = {}
        names = self.layers + [name for name in dict.fromkeys((self.embed_layer, self.patch_layer))
                               if name and name not in self.topk]
        with tapped(self.model, names, self._record) as taps, self.numerics.running(self.device):
            self.model(self.numerics.input(self.normalize(pixels)))
            taps.check_once()
        return self._rows

    def merge_state(self, state: dict[str, torch.Tensor]) -> None:
        """Fold in another accumulator's `state_dict()` over disjoint images (another rank's); exact."""
        for name, topk in self.topk.items():
            other = RunningTopK(topk.channels, topk.k, topk.device)
            other.load_state_dict({key: state[f"{name}/{key}"] for key in ("values", "ids", "positions")})
            topk.merge(other)
            total = ExactSum(topk.channels, topk.device)
            total.load_state_dict({key: state[f"{name}/sum_{key}"] for key in ("buckets", "nonfinite")})
            self.sums[name].merge(total)
            histogram = UnitHistogram(topk.channels, topk.device)
            histogram.load_state_dict({"counts": state[f"{name}/hist_counts"]})
            self.distributions[name].merge(histogram)
            if name in self.by_class:
                other_classes = ClassSums(self.by_class[name].classes, topk.channels, topk.device)
                other_classes.load_state_dict({key: state[f"{name}/class_{key}"] for key in ("sums", "bad", "counts")})
                self.by_class[name].merge(other_classes)
            if name in self.bottom:
                other = RunningTopK(topk.channels, self.bottom[name].k, topk.device)
                other.load_state_dict({key: state[f"{name}/bottom_{key}"] for key in ("values", "ids", "positions")})
                self.bottom[name].merge(other)

    def results(self) -> dict[str, TopKResult]:
        return {name: topk.result() for name, topk in self.topk.items()}

    def lowest(self) -> dict[str, TopKResult]:
        """Per layer, each unit's `bottom_k` images with the lowest minimum over positions, ascending (ties to the
        lower id); {} without `bottom_k`."""
        out = {}
        for name, negated in self.bottom.items():
            result = negated.result()
            # -(-x) is x bit for bit, -0.0 and NaN included; the empty slots' NaN is set again, sign bit clear.
            values = (-result.values).masked_fill(result.ids < 0, float("nan"))
            out[name] = TopKResult(values, result.ids, result.positions)
        return out

    def means(self, images: int) -> dict[str, torch.Tensor]:
        """(C,) float64 mean score of each unit over `images` readable images (NaN with none)."""
        return {name: total.result() / images if images else torch.full((total.channels,), float("nan"),
                                                                           dtype=torch.float64)
                for name, total in self.sums.items()}

    def class_means(self) -> dict[str, torch.Tensor]:
        """(K, C) float64 mean score per class and unit, per layer; {} without classes."""
        return {name: sums.means() for name, sums in self.by_class.items()}

    def histograms(self) -> dict[str, torch.Tensor]:
        """(C, BINS) int64 counts per layer, on the CPU (kernels.histogram has the bins)."""
        return {name: histogram.counts.cpu() for name, histogram in self.distributions.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole state as named CPU tensors: what a checkpoint stores and what ranks gather to merge."""
        state = {f"{name}/{key}": tensor for name, topk in self.topk.items()
                 for key, tensor in topk.state_dict().items()}
        state.update({f"{name}/sum_{key}": tensor for name, total in self.sums.items()
                      for key, tensor in total.state_dict().items()})
        state.update({f"{name}/hist_{key}": tensor for name, histogram in self.distributions.items()
                      for key, tensor in histogram.state_dict().items()})
        state.update({f"{name}/class_{key}": tensor for name, sums in self.by_class.items()
                      for key, tensor in sums.state_dict().items()})
        state.update({f"{name}/bottom_{key}": tensor for name, bottom in self.bottom.items()
                      for key, tensor in bottom.state_dict().items()})  # negated minima
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, topk in self.topk.items():
            topk.load_state_dict({key: state[f"{name}/{key}"] for key in ("values", "ids", "positions")})
            self.sums[name].load_state_dict({key: state[f"{name}/sum_{key}"] for key in ("buckets", "nonfinite")})
            self.distributions[name].load_state_dict({"counts": state[f"{name}/hist_counts"]})
            if name in self.by_class:
                self.by_class[name].load_state_dict({key: state[f"{name}/class_{key}"]
                                                     for key in ("sums", "bad", "counts")})
            if name in self.bottom:
                self.bottom[name].load_state_dict({key: state[f"{name}/bottom_{key}"]
                                                   for key in ("values", "ids", "positions")})


_FLOAT16_MAX = 65504.0


def patch_rows(output: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H * W * C) float16: every position's C channels, positions in row-major order, as
    `/patches/<layer>` stores them (row image * H * W + y * W + x). Values beyond float16's range are clamped
    to its largest finite value, so that they stay vectors with a direction; NaN stays NaN."""
    batch = output.shape[0]
    return output.detach().permute(0, 2, 3, 1).clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16).reshape(batch, -1)

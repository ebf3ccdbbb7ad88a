"""Where in an image a unit fires: its whole activation map over each hit, drawn at the network input's and the
original image's resolution through the receptive fields (`kernels.upsample`), and the region above the
unit's dataset-wide p99 level (netdissect's mask, at the 99th percentile of the unit's image scores)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actindex.indexer.images import CropGeometry
from actindex.kernels.upsample import feature_coordinates, sample_maps, upsample_to_input

Field = tuple[tuple[int, int, int], tuple[int, int, int]]  # (size, stride, padding) along y, then x: LayerGrid.field()


@dataclass(frozen=True)
class UnitMaps:
    """A unit's maps over its hits, and the level its masks are drawn at."""

    maps: np.ndarray  # (n, H, W) float32, the layer's output for the unit over each hit's image
    field: Field
    input_size: int
    level: float | None  # the unit's p99 score over the dataset; None for indexes without distributions

    def at_input(self) -> np.ndarray:
        """(n, S, S) float32 over the network input."""
        return upsample_to_input(torch.from_numpy(self.maps), self.field, self.input_size).numpy()

    def at_original(self, rank: int, geometry: CropGeometry, height: int | None = None,
                    width: int | None = None) -> np.ndarray:
        """(height, width) float32 over hit `rank`'s original image (default: its own pixels; give a smaller
        grid for a picture), NaN where the network input did not reach (outside the crop)."""
        ys, xs = geometry.input_coordinates(height, width)
        (fy, fx) = self.field
        ty, tx = feature_coordinates(ys, *fy), feature_coordinates(xs, *fx)
        return sample_maps(torch.from_numpy(self.maps[rank:rank + 1]), ty, tx)[0].numpy()

    def masks(self, maps: np.ndarray) -> np.ndarray | None:
        """Boolean masks of `maps` (any resolution) where the unit reaches its p99 level; None without one."""
        if self.level is None:
            return None
        with np.errstate(invalid="ignore"):
            return maps >= self.level

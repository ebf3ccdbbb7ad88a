"""Reductions of feature maps over their spatial positions.

A layer's output is (B, C, H, W), or (B, C) for layers without spatial extent (treated as H = W = 1).
Positions are flat row-major indices, y * W + x.
"""

from __future__ import annotations

import torch


def as_maps(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, C) -> (B, C, H·W)."""
    if features.ndim == 2:
        return features.unsqueeze(-1)
    if features.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) or (B, C) output, got shape {tuple(features.shape)}")
    return features.flatten(2)


def spatial_max(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the maximum over positions and the first position (row-major) that holds it.

    Returns values (B, C) float32 and positions (B, C) int64, whatever dtype the network computed in: the
    maximum is taken in that dtype (exact in any), and only the (B, C) values are converted.
    """
    # torch.max along a dim returns the index of the first maximal value.
    values, positions = as_maps(features).max(dim=2)  # (B, C), (B, C)
    return values.float(), positions


def spatial_min(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the minimum over positions and the first position (row-major) that holds it.

    The mirror of `spatial_max` (what suppresses a unit): the minimum is taken in the network's dtype and only
    the (B, C) float32 values are converted, so negating them later is exact whatever that dtype was.
    """
    # torch.min along a dim returns the index of the first minimal value.
    values, positions = as_maps(features).min(dim=2)  # (B, C), (B, C)
    return values.float(), positions


def spatial_mean(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) float32 mean over positions (the per-image activation vector)."""
    return as_maps(features).float().mean(dim=2)


def unravel(positions: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions -> (y, x); negative (empty) positions map to (-1, -1)."""
    y = torch.div(positions, width, rounding_mode="floor")
    x = positions - y * width
    empty = positions < 0
    return y.masked_fill(empty, -1), x.masked_fill(empty, -1)

"""A unit's activation map, drawn at image resolution through its receptive fields.

Convention (that of `receptive_field`): along one axis, feature position y covers the network-input pixels
[y S - P, y S - P + r), so its receptive field's centre lies at y S - P + r / 2 in continuous coordinates,
where input pixel u spans [u, u + 1) and has its centre at u + 0.5. A pixel's value is the bilinear
interpolation of the map between the centres of the positions around it, and the value of the edge position
beyond the first and last centres (as `F.interpolate(..., align_corners=False)` does, which this equals when
r = S and P = 0).
"""

from __future__ import annotations

import torch


def feature_coordinates(pixels: torch.Tensor, size: int, stride: int, padding: int) -> torch.Tensor:
    """Continuous feature-map coordinates of pixel centres: `pixels` (N,) holds input-pixel coordinates (u for
    the pixel spanning [u, u + 1), fractional where a pixel of another image falls between input pixels);
    feature position y is at y exactly when its receptive field is centred on that point."""
    return (pixels.double() + 0.5 + padding - size / 2) / stride


def sample_maps(maps: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor) -> torch.Tensor:
    """(B, H, W) maps sampled bilinearly at feature coordinates ty (Ho,) and tx (Wo,) -> (B, Ho, Wo) float32,
    clamped to the edge positions outside [0, H - 1] x [0, W - 1]. NaN coordinates give NaN."""
    height, width = maps.shape[-2:]
    values = maps.double()
    (y0, y1, wy), (x0, x1, wx) = _corners(ty, height), _corners(tx, width)
    top = values[:, y0][:, :, x0] * (1 - wx) + values[:, y0][:, :, x1] * wx  # (B, Ho, Wo)
    bottom = values[:, y1][:, :, x0] * (1 - wx) + values[:, y1][:, :, x1] * wx
    sampled = top * (1 - wy[:, None]) + bottom * wy[:, None]
    outside = torch.isnan(ty)[:, None] | torch.isnan(tx)[None, :]  # (Ho, Wo)
    return sampled.masked_fill(outside, float("nan")).float()


def _corners(t: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbouring positions (low, high) and the weight of the high one, for coordinates `t` on an axis of n."""
    t = t.double().nan_to_num(0.0).clamp(0, n - 1)
    low = t.floor().long().clamp(max=n - 1)
    high = (low + 1).clamp(max=n - 1)
    return low, high, (t - low).to(torch.float64)


def upsample_to_input(maps: torch.Tensor, field: tuple[tuple[int, int, int], tuple[int, int, int]],
                      input_size: int) -> torch.Tensor:
    """(B, H, W) maps -> (B, S, S) float32 over the network input; `field` is (size, stride, padding) per axis
    (y, then x)."""
    pixels = torch.arange(input_size, dtype=torch.float64)
    (fy, fx) = field
    return sample_maps(maps, feature_coordinates(pixels, *fy), feature_coordinates(pixels, *fx))

"""Gaussian blur of image batches and a measure of how much of an image's energy is high-frequency.

Images are (B, C, H, W) float tensors. The blur is separable and depthwise (each channel on its own), with
reflect padding so that the border is not darkened; an axis shorter than the kernel's radius cannot be
reflected and is padded by replicating its edge instead.

Frequencies are normalized to Nyquist: 1.0 is half a cycle per pixel on an axis, and the radial frequency of
a 2-D component (fy, fx) is sqrt(fy² + fx²), so the corners of the spectrum reach sqrt(2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, radius: int | None = None) -> torch.Tensor:
    """(2·radius + 1,) float32 Gaussian weights summing to 1; radius defaults to ceil(3·sigma).

    sigma <= 0 gives the identity kernel [1.0].
    """
    if sigma <= 0:
        return torch.ones(1)
    if radius is None:
        radius = math.ceil(3 * sigma)
    if radius < 0:
        raise ValueError(f"radius must be non-negative, got {radius}")
    # float64 so that the normalized weights sum to 1 to float32 precision for any radius
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)  # (K,)
    weights = torch.exp(-0.5 * (t / sigma) ** 2)
    return (weights / weights.sum()).float()


def _blur_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Depthwise 1-D convolution of (B, C, H, W) along dim 2 (rows) or 3 (columns), same size out."""
    radius = kernel.numel() // 2
    channels = x.shape[1]
    # F.pad's reflect mode needs the padding to be smaller than the axis it reflects.
    mode = "reflect" if x.shape[dim] > radius else "replicate"
    if dim == 3:
        padded = F.pad(x, (radius, radius, 0, 0), mode=mode)  # (B, C, H, W + 2r)
        weight = kernel.view(1, 1, 1, -1)
    else:
        padded = F.pad(x, (0, 0, radius, radius), mode=mode)  # (B, C, H + 2r, W)
        weight = kernel.view(1, 1, -1, 1)
    weight = weight.to(x.device, x.dtype).expand(channels, 1, *weight.shape[2:])  # (C, 1, kh, kw)
    return F.conv2d(padded, weight, groups=channels)  # (B, C, H, W)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W) blurred with a Gaussian of standard deviation `sigma` pixels.

    sigma <= 0 returns `x` itself. Differentiable; works on any device and floating dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if sigma <= 0:
        return x
    kernel = gaussian_kernel1d(sigma)  # (K,)
    return _blur_axis(_blur_axis(x, kernel, dim=3), kernel, dim=2)


def radial_frequency(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) radial frequency of each FFT bin, normalized to Nyquist (see the module docstring)."""
    fy = torch.fft.fftfreq(height, device=device) / 0.5  # (H,) in [-1, 1)
    fx = torch.fft.fftfreq(width, device=device) / 0.5  # (W,)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)  # (H, W)


def high_frequency_energy(x: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """(B, C, H, W) -> (B,) fraction of each image's spectral energy above `cutoff` (radial, of Nyquist).

    Each channel's mean is removed first, so a brightness or colour offset does not count as low-frequency
    energy; energy is summed over channels. An image that is constant in every channel has no energy and
    gets 0.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    x = x.double()
    centred = x - x.mean(dim=(2, 3), keepdim=True)  # (B, C, H, W)
    power = torch.fft.fft2(centred).abs() ** 2  # (B, C, H, W)
    high = radial_frequency(x.shape[2], x.shape[3], device=x.device) > cutoff  # (H, W)
    total = power.sum(dim=(1, 2, 3))  # (B,)
    above = (power * high).sum(dim=(1, 2, 3))  # (B,)
    fraction = torch.where(total > 0, above / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
    return fraction.float()

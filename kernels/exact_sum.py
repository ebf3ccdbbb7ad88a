"""Exact, order-independent sums of float32 values per channel: the same result however images are batched,
sharded over processes or resumed, so a dataset mean is as reproducible as the top-k tables.

Every finite float32 value is m · 2^(e − 24) with an integer |m| < 2^24 and e = frexp's exponent in
[−148, 128]. The accumulator keeps, per channel, one int64 per exponent: the sum of the m's with that
exponent. Integer addition is exact and associative, so adding batches in any order and merging any split
gives the same integers; `result()` turns them into the correctly rounded float64 sum. Each bucket takes
2^39 values before it could overflow (over 5·10^11 images).
"""

from __future__ import annotations

import torch

_MIN_EXPONENT = -148  # frexp exponent of the smallest float32 subnormal, 2^-149 = 0.5 · 2^-148
_MAX_EXPONENT = 128  # frexp exponent of the largest float32, just below 2^128
BUCKETS = _MAX_EXPONENT - _MIN_EXPONENT + 1
_MANTISSA_BITS = 24


class ExactSum:
    """Per-channel exact sums of float32 values; non-finite values make that channel's sum NaN."""

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.channels = channels
        self.device = torch.device(device)
        self.buckets = torch.zeros(channels, BUCKETS, dtype=torch.int64, device=self.device)  # (C, E)
        self.nonfinite = torch.zeros(channels, dtype=torch.int64, device=self.device)  # (C,)

    def add(self, values: torch.Tensor) -> None:
        """Fold in (B, C) float32 values."""
        if values.dtype != torch.float32:
            raise TypeError(f"ExactSum adds float32 values, not {values.dtype}")
        finite = torch.isfinite(values)  # (B, C)
        self.nonfinite += (~finite).sum(0)
        mantissa, exponent = torch.frexp(torch.where(finite, values, 0.0))  # (B, C) each; 0 -> (0, 0)
        integers = torch.ldexp(mantissa, torch.tensor(float(_MANTISSA_BITS), device=values.device)).to(torch.int64)
        channel = torch.arange(self.channels, device=values.device).expand_as(values)  # (B, C)
        slot = channel * BUCKETS + (exponent.to(torch.int64) - _MIN_EXPONENT)  # (B, C) flat bucket index
        self.buckets.view(-1).index_add_(0, slot.flatten(), integers.flatten())  # integer adds: exact

    def merge(self, other: ExactSum) -> None:
        self.buckets += other.buckets.to(self.device)
        self.nonfinite += other.nonfinite.to(self.device)

    def result(self) -> torch.Tensor:
        """(C,) float64 sums, each the exact sum correctly rounded (NaN where a value was not finite)."""
        buckets = self.buckets.cpu().tolist()
        nonfinite = self.nonfinite.cpu().tolist()
        shift = -_MIN_EXPONENT + _MANTISSA_BITS  # bucket b holds multiples of 2^(b + _MIN_EXPONENT - 24)
        sums = []
        for row, bad in zip(buckets, nonfinite, strict=True):
            total = sum(count << b for b, count in enumerate(row) if count)  # Python int: exact
            sums.append(float("nan") if bad else _ratio_to_float(total, shift))
        return torch.tensor(sums, dtype=torch.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"buckets": self.buckets, "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["buckets"].shape) != (self.channels, BUCKETS):
            raise ValueError(f"ExactSum state of shape {tuple(state['buckets'].shape)}, expected "
                             f"{(self.channels, BUCKETS)}")
        self.buckets = state["buckets"].to(self.device, torch.int64).clone()
        self.nonfinite = state["nonfinite"].to(self.device, torch.int64).clone()


def _ratio_to_float(total: int, shift: int) -> float:
    """total / 2^shift, correctly rounded: Python's int / int division is."""
    return total / (1 << shift)

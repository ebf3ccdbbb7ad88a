"""Per-class sums of each unit's scores, exact in fixed point: the same however images are batched, sharded or
resumed, for the class means behind "which classes does this unit fire for?".

Each score is rounded to a multiple of 2^-FRACTION_BITS and the multiples are added in int64, one per (class,
unit): integer addition is exact and associative. A mean is therefore within 2^-(FRACTION_BITS + 1) ≈ 3·10^-8 of
the mean of the float32 scores (the rounding of each one, averaged), whatever the number of images. Scores of
magnitude 2^MAX_EXPONENT or more (or not finite) make that class's mean NaN. A sum overflows only when a class's
images times their scores reach 2^(63 - FRACTION_BITS) = 2^39 ≈ 5.5·10^11 (5·10^9 images of one class at a score
of 100).

State: (K, C) int64 sums and out-of-range counts, and (K,) image counts: 32 MB for 1 000 classes × 2 048 units.
"""

from __future__ import annotations

import torch

FRACTION_BITS = 24
MAX_EXPONENT = 30  # |score| < 2^30 is summed; larger ones mark the class mean NaN


class ClassSums:
    """Per (class, unit) exact sums of (B, C) float32 scores with (B,) class labels in [0, classes)."""

    def __init__(self, classes: int, channels: int, device: torch.device | str = "cpu") -> None:
        self.classes, self.channels = classes, channels
        self.device = torch.device(device)
        self.sums = torch.zeros(classes, channels, dtype=torch.int64, device=self.device)  # (K, C)
        self.bad = torch.zeros(classes, channels, dtype=torch.int64, device=self.device)  # (K, C)
        self.counts = torch.zeros(classes, dtype=torch.int64, device=self.device)  # (K,)

    def add(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold in (B, C) float32 scores of images of classes `labels` (B,) int64."""
        ok = torch.isfinite(values) & (values.abs() < 2.0**MAX_EXPONENT)  # (B, C)
        fixed = torch.ldexp(torch.where(ok, values, 0.0).double(), torch.tensor(float(FRACTION_BITS),
                                                                             device=values.device))
        self.sums.index_add_(0, labels, fixed.round().to(torch.int64))  # integer adds: exact, any order
        self.bad.index_add_(0, labels, (~ok).to(torch.int64))
        self.counts.index_add_(0, labels, torch.ones_like(labels))

    def merge(self, other: ClassSums) -> None:
        self.sums += other.sums.to(self.device)
        self.bad += other.bad.to(self.device)
        self.counts += other.counts.to(self.device)

    def means(self) -> torch.Tensor:
        """(K, C) float64 mean score per class and unit; NaN for a class without images or with a bad score."""
        sums = self.sums.cpu().to(torch.float64) / 2.0**FRACTION_BITS  # int64 -> float64: exact below 2^53
        means = sums / self.counts.cpu().to(torch.float64).unsqueeze(1)
        return means.masked_fill((self.bad.cpu() > 0) | (self.counts.cpu() == 0).unsqueeze(1), float("nan"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums, "bad": self.bad, "counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["sums"].shape) != (self.classes, self.channels):
            raise ValueError(f"ClassSums state of shape {tuple(state['sums'].shape)}, expected "
                             f"{(self.classes, self.channels)}")
        self.sums, self.bad, self.counts = (state[key].to(self.device, torch.int64).clone()
                                            for key in ("sums", "bad", "counts"))


def selectivity(means: torch.Tensor) -> torch.Tensor:
    """(K, C) class means -> (C,) class-selectivity index (Morcos et al. 2018): (μ_max − μ_rest) / (μ_max + μ_rest),
    μ_max the largest class mean, μ_rest the mean of the other classes' means. 0: no preference, 1: fires for one
    class only. Defined, as there, for non-negative class means (units after a ReLU): NaN where a class mean is
    negative (logits, units before their activation), with fewer than two classes, or when all means are 0."""
    valid = ~torch.isnan(means)  # (K, C)
    k = valid.sum(0)  # (C,)
    filled = means.nan_to_num(float("-inf"))
    best = filled.max(0).values  # (C,)
    rest = (means.nan_to_num(0.0).sum(0) - best) / (k - 1).clamp_min(1)
    index = (best - rest) / (best + rest)
    lowest = means.nan_to_num(float("inf")).min(0).values
    defined = (k >= 2) & (best + rest > 0) & (lowest >= 0)
    return torch.where(defined, index, torch.full_like(index, float("nan")))

"""Exact per-unit histograms of float32 scores in fixed log-spaced bins, fine enough for quantiles to 1 %.

A bin is an octave [2^e, 2^(e+1)) of the magnitude split into SUB_BINS equal parts, read straight from the
float32 bits (the exponent and the top mantissa bits), for e in [MIN_EXPONENT, MAX_EXPONENT); magnitudes
below the range, above it (infinity included), zero and NaN have bins of their own. Bins are laid out in
increasing value, negative side mirrored:

    0            values <= -2^MAX_EXPONENT (overflow)
    1 .. P       negative in-range bins, from the most negative     (P = octaves · SUB_BINS)
    P + 1        -2^MIN_EXPONENT < value < 0 (underflow)
    P + 2        exactly 0 (either sign)
    P + 3        0 < value < 2^MIN_EXPONENT
    P + 4 .. 2P + 3   positive in-range bins
    2P + 4       values >= 2^MAX_EXPONENT
    2P + 5       NaN

Counts are int64 and integer addition is exact and associative: any batching, any split over processes and
any resume give the same counts. A bin is 1/64 of an octave wide, so its midpoint is within 2^-7 (0.78 %) of
any value in it: a quantile read from the counts is within 0.78 % of the exact one (the value in the sorted
scores that `numpy.quantile(..., method="inverted_cdf")` returns), whenever that value is in the range.
"""

from __future__ import annotations

import torch

MIN_EXPONENT = -20  # 2^-20 ≈ 9.5e-7: smaller magnitudes count as underflow
MAX_EXPONENT = 20  # 2^20 ≈ 1.05e6: larger ones as overflow
SUB_BINS = 64
_SUB_BITS = 6  # log2(SUB_BINS)
PER_SIGN = (MAX_EXPONENT - MIN_EXPONENT) * SUB_BINS
ZERO = PER_SIGN + 2  # the bin of 0
NAN = 2 * PER_SIGN + 5
BINS = NAN + 1


def bin_index(values: torch.Tensor) -> torch.Tensor:
    """The bin of each float32 value, same shape, int64."""
    bits = values.to(torch.float32).view(torch.int32).to(torch.int64)  # sign-extended
    magnitude = bits & 0x7FFFFFFF
    exponent = (magnitude >> 23) - 127  # subnormals: -127, infinity and NaN: 128
    in_range = (exponent - MIN_EXPONENT) * SUB_BINS + ((magnitude >> (23 - _SUB_BITS)) & (SUB_BINS - 1))
    offset = torch.where(exponent < MIN_EXPONENT, 1, torch.where(exponent >= MAX_EXPONENT, PER_SIGN + 2,
                                                                 in_range + 2))  # distance from ZERO
    index = torch.where(bits < 0, ZERO - offset, ZERO + offset)
    index = torch.where(magnitude == 0, ZERO, index)
    return torch.where(torch.isnan(values), NAN, index)


def bin_midpoints() -> torch.Tensor:
    """(BINS,) float64: the value each bin stands for in a quantile. In-range bins: their midpoint; underflow:
    0; overflow: ±2^MAX_EXPONENT (a bound: the value is at least that large); NaN: NaN."""
    octave = torch.arange(PER_SIGN, dtype=torch.float64) // SUB_BINS
    sub = torch.arange(PER_SIGN, dtype=torch.float64) % SUB_BINS
    mid = torch.pow(2.0, octave + MIN_EXPONENT) * (1 + (sub + 0.5) / SUB_BINS)  # (P,) ascending
    big = torch.tensor([2.0**MAX_EXPONENT], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    return torch.cat([-big, -mid.flip(0), zero, mid, big, torch.tensor([float("nan")], dtype=torch.float64)])


class UnitHistogram:
    """Per-channel histograms of float32 scores: `add` (B, C) batches, `merge` other shards, `counts` (C, BINS)."""

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.channels = channels
        self.device = torch.device(device)
        self.counts = torch.zeros(channels, BINS, dtype=torch.int64, device=self.device)  # (C, BINS)

    def add(self, values: torch.Tensor) -> None:
        """Fold in (B, C) scores."""
        channel = torch.arange(self.channels, device=values.device).expand_as(values)  # (B, C)
        slot = channel * BINS + bin_index(values)  # (B, C) flat index into counts
        self.counts.view(-1).index_add_(0, slot.flatten(), torch.ones(slot.numel(), dtype=torch.int64,
                                                                      device=values.device))

    def merge(self, other: UnitHistogram) -> None:
        self.counts += other.counts.to(self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["counts"].shape) != (self.channels, BINS):
            raise ValueError(f"UnitHistogram state of shape {tuple(state['counts'].shape)}, expected "
                             f"{(self.channels, BINS)}")
        self.counts = state["counts"].to(self.device, torch.int64).clone()


def quantiles(counts: torch.Tensor, qs: list[float]) -> torch.Tensor:
    """(C, BINS) counts -> (C, len(qs)) float64: per unit, the value of the bin that holds the q-quantile (the
    smallest score with at least a fraction q of the scores at or below it); NaN for a unit without scores."""
    finite = counts[:, :NAN].to(torch.float64)  # NaN scores are not ranked
    total = finite.sum(1, keepdim=True)  # (C, 1)
    cumulative = finite.cumsum(1)  # (C, NAN)
    targets = torch.tensor(qs, dtype=torch.float64, device=counts.device).unsqueeze(0) * total  # (C, Q)
    # the first bin whose cumulative count reaches q·n (at least one score: q = 0 gives the minimum)
    where = torch.searchsorted(cumulative, targets.clamp_min(1.0)).clamp_max(NAN - 1)  # (C, Q)
    values = bin_midpoints().to(counts.device)[where]
    return torch.where(total > 0, values, torch.full_like(values, float("nan")))


def firing_rate(counts: torch.Tensor) -> torch.Tensor:
    """(C, BINS) counts -> (C,) float64: the fraction of (non-NaN) scores above 0, exact."""
    total = counts[:, :NAN].sum(1).to(torch.float64)
    positive = counts[:, ZERO + 1:NAN].sum(1).to(torch.float64)
    return positive / total

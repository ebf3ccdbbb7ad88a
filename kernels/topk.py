"""Running per-channel top-k with global ids, positions and an exact, deterministic tie-break.

The order of entries is defined by the pair (value, id): a higher value ranks first, equal values rank the
lower id first. Both are packed into one int64 key so that a single `torch.topk` over keys gives that order
exactly, on any device and whatever the batch size, number of processes or merge order:

    key = ordered_bits(value) * 2**32 + (2**32 - 1 - id)

`ordered_bits` maps float32 to int32 monotonically (IEEE-754 sign-magnitude to two's complement). Since ids
are unique, keys are unique, so `topk` has no ties to resolve and its result is deterministic. -0.0 is folded
into +0.0 and every NaN into one canonical NaN, which ranks above +inf as in `torch.topk`.

Empty slots (fewer than k images seen) hold id -1 and the lowest key; `result()` reports them as NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ID_LIMIT = 2**32  # ids must lie in [0, 2**32)
_EMPTY_KEY = torch.iinfo(torch.int64).min


def ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 holding an int32 whose signed order equals the float order."""
    v = values.float() + 0.0  # -0.0 + 0.0 == +0.0
    v = torch.where(torch.isnan(v), torch.full_like(v, float("nan")), v)  # one NaN bit pattern
    bits = v.view(torch.int32)
    # Negative floats grow in magnitude as their bits grow; flipping the 31 low bits reverses that.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(torch.int64)


def pack_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(…) float values, (…) int64 ids -> (…) int64 keys; empty slots (id < 0) get the lowest key."""
    keys = ordered_bits(values) * _ID_LIMIT + (_ID_LIMIT - 1 - ids)
    return torch.where(ids < 0, torch.full_like(keys, _EMPTY_KEY), keys)


@dataclass
class TopKResult:
    """Per channel, the k best entries in rank order. Empty slots: value NaN, id -1, position -1."""

    values: torch.Tensor  # (C, k) float32, descending
    ids: torch.Tensor  # (C, k) int64
    positions: torch.Tensor  # (C, k) int64, flat index into the feature map (y * W + x)


class RunningTopK:
    """Keeps, for each of C channels, the k entries with the highest values seen so far.

    State is O(C·k) whatever the number of entries added. `add` takes one batch of per-image scores,
    `merge` folds in another accumulator (another rank, another shard); both are exact.

    As netdissect's RunningTopK does, batches are first copied into a buffer of a few batches' width and
    compacted with one `topk` when it is full: on a GPU a merge is a dozen small kernels, and paying
    them once per few batches instead of once per batch keeps the indexing cost small against the
    forward pass. The buffer holds `buffer_batches` batches of the first batch's size (at least k).
    """

    def __init__(self, channels: int, k: int, device: torch.device | str = "cpu", buffer_batches: int = 4) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.channels = channels
        self.k = k
        self.buffer_batches = buffer_batches
        self.keys = torch.full((channels, k), _EMPTY_KEY, dtype=torch.int64, device=device)
        self.values = torch.full((channels, k), float("nan"), dtype=torch.float32, device=device)
        self.ids = torch.full((channels, k), -1, dtype=torch.int64, device=device)
        self.positions = torch.full((channels, k), -1, dtype=torch.int64, device=device)
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (C, width) each
        self._filled = 0

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def add(self, values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Add one batch: values (B, C) scores, ids (B,) global image ids, positions (B, C) flat indices."""
        if values.ndim != 2 or values.shape[1] != self.channels:
            raise ValueError(f"expected values of shape (B, {self.channels}), got {tuple(values.shape)}")
        batch = values.shape[0]
        if batch == 0:
            return
        if self._pending is None:
            width = max(self.buffer_batches * batch, self.k)
            self._pending = (torch.empty((self.channels, width), dtype=torch.float32, device=self.device),
                             torch.empty((self.channels, width), dtype=torch.int64, device=self.device),
                             torch.empty((self.channels, width), dtype=torch.int64, device=self.device))
        width = self._pending[0].shape[1]
        if self._filled + batch > width:
            self._compact()
        ids = ids.to(self.device, torch.int64, non_blocking=True)
        if batch > width:  # a batch larger than the buffer: merge it directly
            self._merge(values.t().float(), ids.expand(self.channels, -1), positions.t().to(torch.int64))
            return
        end = self._filled + batch
        buffer_values, buffer_ids, buffer_positions = self._pending
        buffer_values[:, self._filled:end] = values.t()  # (C, B)
        buffer_ids[:, self._filled:end] = ids  # (B,) broadcast over channels
        buffer_positions[:, self._filled:end] = positions.t()
        self._filled = end

    def merge(self, other: RunningTopK) -> None:
        """Fold in another accumulator over disjoint ids; the result equals one pass over both inputs."""
        if (other.channels, other.k) != (self.channels, self.k):
            raise ValueError(f"cannot merge top-k of shape {(other.channels, other.k)} into "
                             f"{(self.channels, self.k)}")
        self._compact()
        other._compact()
        self._merge(other.values.to(self.device), other.ids.to(self.device), other.positions.to(self.device))

    def _compact(self) -> None:
        """Merge the buffered batches into the top-k state and empty the buffer."""
        if self._pending is None or self._filled == 0:
            return
        values, ids, positions = (t[:, :self._filled] for t in self._pending)
        self._merge(values, ids, positions)
        self._filled = 0

    def _merge(self, values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> None:
        # values, ids, positions: (C, n) candidates
        keys = torch.cat([self.keys, pack_keys(values, ids)], dim=1)  # (C, k + n)
        all_values = torch.cat([self.values, values], dim=1)
        all_ids = torch.cat([self.ids, ids], dim=1)
        all_positions = torch.cat([self.positions, positions], dim=1)
        self.keys, index = torch.topk(keys, self.k, dim=1, largest=True, sorted=True)  # (C, k)
        self.values = all_values.gather(1, index)
        self.ids = all_ids.gather(1, index)
        self.positions = all_positions.gather(1, index)

    def result(self) -> TopKResult:
        self._compact()
        empty = self.ids < 0
        return TopKResult(
            values=self.values.masked_fill(empty, float("nan")),
            ids=self.ids.clone(),
            positions=self.positions.masked_fill(empty, -1),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """(C, k) values, ids and positions as plain named CPU tensors (safetensors-compatible); empty slots hold
        id -1; keys are derived, not stored."""
        self._compact()
        return {"values": self.values.cpu(), "ids": self.ids.cpu(), "positions": self.positions.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        shape = (self.channels, self.k)
        for name in ("values", "ids", "positions"):
            if tuple(state[name].shape) != shape:
                raise ValueError(f"top-k state '{name}' has shape {tuple(state[name].shape)}, expected {shape}")
        self.values = state["values"].to(self.device, torch.float32)
        self.ids = state["ids"].to(self.device, torch.int64)
        self.positions = state["positions"].to(self.device, torch.int64)
        self.keys = pack_keys(self.values, self.ids)
        self._filled = 0

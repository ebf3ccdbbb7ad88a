"""ExactSum: per-channel sums of float32 values that equal math.fsum and do not depend on order or splits."""

from __future__ import annotations

import math

import pytest
import torch

from actindex.kernels.exact_sum import BUCKETS, ExactSum


def values(rows: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Signs, magnitudes from 2^-149 (subnormal) to 2^127, zeros, and the float32 extremes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=g) * torch.exp2(torch.randint(-126, 100, (rows, channels),
                                                                             generator=g).float())
    x = x.float()
    x[0, 0], x[1, 0], x[2, 0] = 1e-45, -3e-44, torch.finfo(torch.float32).max
    x[3, 1], x[4, 1] = torch.finfo(torch.float32).tiny, 0.0
    return x


def fsum(x: torch.Tensor) -> list[float]:
    return [math.fsum(x[:, c].double().tolist()) for c in range(x.shape[1])]


def test_sum_equals_fsum_over_the_whole_float32_range() -> None:
    x = values(2000, 6)
    total = ExactSum(6)
    total.add(x)
    assert total.result().tolist() == fsum(x)


def test_cancellation_that_float64_loses_is_exact() -> None:
    x = torch.tensor([[2.0 ** 100], [1.0], [-(2.0 ** 100)]], dtype=torch.float32)
    total = ExactSum(1)
    total.add(x)
    assert x.double().sum().item() == 0.0 and total.result().item() == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batching_order_and_merging_give_identical_bits(seed: int) -> None:
    x = values(999, 4, seed)
    whole = ExactSum(4)
    whole.add(x)
    g = torch.Generator().manual_seed(seed)
    shuffled = x[torch.randperm(len(x), generator=g)]
    parts = [ExactSum(4) for _ in range(3)]
    cuts = sorted(torch.randint(0, len(x), (2,), generator=g).tolist())
    for part, block in zip(parts, (shuffled[:cuts[0]], shuffled[cuts[0]:cuts[1]], shuffled[cuts[1]:]), strict=True):
        for start in range(0, len(block), 17):
            part.add(block[start:start + 17])
    parts[2].merge(parts[0])
    parts[2].merge(parts[1])
    assert torch.equal(parts[2].result(), whole.result())
    assert torch.equal(parts[2].buckets, whole.buckets)


def test_non_finite_values_make_only_their_channel_nan() -> None:
    x = torch.ones(5, 3)
    x[2, 1] = float("nan")
    x[3, 2] = float("inf")
    total = ExactSum(3)
    total.add(x)
    result = total.result()
    assert result[0].item() == 5.0 and math.isnan(result[1].item()) and math.isnan(result[2].item())


def test_state_round_trip_and_shape_check() -> None:
    x = values(100, 3)
    total = ExactSum(3)
    total.add(x)
    again = ExactSum(3)
    again.load_state_dict({k: v.clone() for k, v in total.state_dict().items()})
    assert torch.equal(again.result(), total.result())
    with pytest.raises(ValueError, match="shape"):
        ExactSum(2).load_state_dict(total.state_dict())
    assert total.state_dict()["buckets"].shape == (3, BUCKETS)


def test_float32_only() -> None:
    with pytest.raises(TypeError, match="float32"):
        ExactSum(1).add(torch.ones(2, 1, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sums_equal_cpu_sums() -> None:
    x = values(4096, 8)
    cpu, gpu = ExactSum(8), ExactSum(8, "cuda")
    cpu.add(x)
    for start in range(0, len(x), 1000):
        gpu.add(x[start:start + 1000].cuda())
    assert torch.equal(cpu.result(), gpu.result())

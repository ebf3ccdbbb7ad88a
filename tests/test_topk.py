"""RunningTopK against references computed over all the data at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actindex.kernels.spatial import spatial_max, spatial_mean, spatial_min, unravel
from actindex.kernels.topk import RunningTopK, ordered_bits


def stream(values: torch.Tensor, positions: torch.Tensor, k: int, batch: int) -> RunningTopK:
    """Feed (N, C) scores in id order, `batch` rows at a time."""
    acc = RunningTopK(values.shape[1], k)
    for start in range(0, values.shape[0], batch):
        ids = torch.arange(start, min(start + batch, values.shape[0]))
        acc.add(values[ids], ids, positions[ids])
    return acc


def lexsort_reference(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column of (N, C): the k rows with the highest value, ties to the lower row, by a full sort."""
    n, c = values.shape
    ids = np.zeros((c, k), dtype=np.int64)
    for ch in range(c):
        order = np.lexsort((np.arange(n), -values[:, ch].astype(np.float64)))  # last key is primary
        ids[ch] = order[:k]
    return np.take_along_axis(values.T, ids, axis=1), ids


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_stream_equals_topk_over_concatenated_data(batch: int) -> None:
    torch.manual_seed(batch)
    values = torch.randn(300, 17)  # (N, C): continuous, no ties
    positions = torch.randint(0, 49, (300, 17))
    result = stream(values, positions, k=9, batch=batch).result()
    expected_values, expected_ids = torch.topk(values.t(), 9, dim=1)  # (C, k)
    torch.testing.assert_close(result.values, expected_values, rtol=0, atol=0)
    assert torch.equal(result.ids, expected_ids)
    assert torch.equal(result.positions, positions.t().gather(1, expected_ids))


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_ties_go_to_the_lower_id(batch: int) -> None:
    rng = np.random.default_rng(batch)
    values = rng.integers(0, 4, size=(200, 11)).astype(np.float32)  # massive ties
    values[:, 0] = 1.0  # a channel where every image ties
    values[5:9, 1] = -0.0  # signed zeros tie with +0.0
    values[:, 1] = np.where(values[:, 1] == 0, -0.0, values[:, 1])
    result = stream(torch.from_numpy(values), torch.zeros(200, 11, dtype=torch.int64), 9, batch).result()
    expected_values, expected_ids = lexsort_reference(values, 9)
    assert np.array_equal(result.ids.numpy(), expected_ids)
    assert np.array_equal(result.values.numpy(), expected_values)
    assert result.ids[0].tolist() == list(range(9))


def test_fewer_images_than_k_pad_with_nan_and_minus_one() -> None:
    values = torch.tensor([[1.0, -2.0], [3.0, -1.0]])  # (N=2, C=2)
    result = stream(values, torch.tensor([[4, 5], [6, 7]]), k=4, batch=1).result()
    assert result.ids.tolist() == [[1, 0, -1, -1], [1, 0, -1, -1]]
    assert result.positions.tolist() == [[6, 4, -1, -1], [7, 5, -1, -1]]
    assert result.values[:, :2].tolist() == [[3.0, 1.0], [-1.0, -2.0]]
    assert torch.isnan(result.values[:, 2:]).all()


def test_negative_and_infinite_values_rank_like_floats() -> None:
    values = torch.tensor([-3.0, -1e-30, float("-inf"), 2.0, float("inf"), -0.5, 0.0]).unsqueeze(1)
    result = stream(values, torch.zeros_like(values, dtype=torch.int64), k=7, batch=3).result()
    assert result.values[0].tolist() == sorted(values[:, 0].tolist(), reverse=True)


def test_ordered_bits_is_monotone() -> None:
    x = torch.sort(torch.cat([torch.randn(1000) * 1e3, torch.randn(1000) * 1e-30,
                              torch.tensor([0.0, float("inf"), float("-inf")])])).values
    assert (ordered_bits(x).diff() >= 0).all()


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_merge_of_shards_equals_one_pass(parts: int) -> None:
    torch.manual_seed(parts)
    values = torch.randint(0, 6, (250, 13)).float()  # with ties across shards
    positions = torch.randint(0, 100, (250, 13))
    whole = stream(values, positions, 9, 16).result()
    bounds = [250 * r // parts for r in range(parts + 1)]  # contiguous ranges, as ranks read them
    shards = []
    for i0, i1 in zip(bounds, bounds[1:], strict=False):
        acc = RunningTopK(13, 9)
        for start in range(i0, i1, 10):
            ids = torch.arange(start, min(start + 10, i1))
            acc.add(values[ids], ids, positions[ids])
        shards.append(acc)
    merged = shards[-1]  # merge in an arbitrary order: the result must not depend on it
    for shard in shards[:-1]:
        merged.merge(shard)
    result = merged.result()
    assert torch.equal(result.ids, whole.ids)
    assert torch.equal(result.positions, whole.positions)
    assert torch.equal(result.values, whole.values)


def test_state_dict_round_trip_resumes_exactly() -> None:
    torch.manual_seed(0)
    values, positions = torch.randn(100, 5), torch.randint(0, 9, (100, 5))
    first = stream(values[:40], positions[:40], 9, 8)
    resumed = RunningTopK(5, 9)
    resumed.load_state_dict(first.state_dict())
    for start in range(40, 100, 8):
        ids = torch.arange(start, min(start + 8, 100))
        resumed.add(values[ids], ids, positions[ids])
    whole = stream(values, positions, 9, 8).result()
    assert torch.equal(resumed.result().ids, whole.ids)
    with pytest.raises(ValueError, match="shape"):
        RunningTopK(5, 4).load_state_dict(first.state_dict())


def test_spatial_max_takes_the_first_maximum_in_row_major_order() -> None:
    maps = torch.zeros(2, 3, 4, 5)
    maps[0, 0, 1, 2] = maps[0, 0, 3, 0] = 7.0  # tie: (1, 2) comes first in row-major order
    maps[1, 2] = -1.0  # all equal: position 0
    values, positions = spatial_max(maps)
    assert values[0, 0] == 7.0 and positions[0, 0] == 1 * 5 + 2
    assert positions[1, 2] == 0
    y, x = unravel(positions, 5)
    assert (y[0, 0], x[0, 0]) == (1, 2)
    torch.testing.assert_close(spatial_mean(maps), maps.mean(dim=(2, 3)))


def test_spatial_min_takes_the_first_minimum_in_row_major_order_as_float32() -> None:
    maps = torch.zeros(2, 3, 4, 5)
    maps[0, 0, 1, 2] = maps[0, 0, 3, 0] = -7.0  # tie: (1, 2) comes first in row-major order
    maps[1, 2] = 1.0  # all equal: position 0
    values, positions = spatial_min(maps)
    assert values[0, 0] == -7.0 and positions[0, 0] == 1 * 5 + 2
    assert values[1, 2] == 1.0 and positions[1, 2] == 0
    half = (maps - 2.0**-9).bfloat16()  # bf16 outputs: -7 - 2^-9 rounds to -7, 0 - 2^-9 is exact
    values, positions = spatial_min(half)
    assert values.dtype == torch.float32 and values[0, 0] == -7.0 and positions[0, 0] == 1 * 5 + 2
    assert values[0, 1] == -(2.0**-9)


def test_k_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="k must be at least 1"):
        RunningTopK(3, 0)


def test_irregular_batches_and_batches_larger_than_the_buffer() -> None:
    torch.manual_seed(3)
    values, positions = torch.randint(0, 5, (400, 6)).float(), torch.randint(0, 30, (400, 6))
    acc, start = RunningTopK(6, 9, buffer_batches=2), 0
    for size in (1, 3, 50, 2, 200, 7, 0, 137):  # the buffer is sized by the first batch: max(2·1, k) columns
        ids = torch.arange(start, start + size)
        acc.add(values[ids], ids, positions[ids])
        start += size
    expected_values, expected_ids = lexsort_reference(values.numpy(), 9)
    result = acc.result()
    assert np.array_equal(result.ids.numpy(), expected_ids)
    assert np.array_equal(result.positions.numpy(), np.take_along_axis(positions.t().numpy(), expected_ids, 1))

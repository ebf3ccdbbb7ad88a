"""nearest_by_overlap against a brute-force Jaccard over every pair of units."""

from __future__ import annotations

import pytest
import torch

from actindex.kernels.overlap import nearest_by_overlap


def brute_force(sets: torch.Tensor, n: int) -> tuple[list[list[int]], list[list[float]], list[list[int]]]:
    groups = [{int(i) for i in row if i >= 0} for row in sets]
    index, overlap, count = [], [], []
    for a, mine in enumerate(groups):
        scored = []
        for b, theirs in enumerate(groups):
            shared = len(mine & theirs)
            if b != a and shared:
                scored.append((-shared / len(mine | theirs), b, shared))
        scored.sort()
        chosen = scored[:n]
        index.append([b for _, b, _ in chosen] + [-1] * (n - len(chosen)))
        overlap.append([-j for j, _, _ in chosen] + [0.0] * (n - len(chosen)))
        count.append([c for _, _, c in chosen] + [0] * (n - len(chosen)))
    return index, overlap, count


@pytest.mark.parametrize("seed", range(4))
def test_equals_brute_force_with_ties_duplicates_and_empty_slots(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sets = torch.randint(0, 30, (40, 6), generator=g)  # few images: many overlaps and ties
    sets[torch.rand(40, 6, generator=g) < 0.15] = -1
    sets[3] = -1  # a unit with no hits
    sets[5, 1] = sets[5, 0]  # a duplicate id counts once
    index, overlap, count = nearest_by_overlap(sets, 5)
    expected_index, expected_overlap, expected_count = brute_force(sets, 5)
    assert index.tolist() == expected_index
    assert count.tolist() == expected_count
    assert torch.allclose(overlap, torch.tensor(expected_overlap), atol=1e-6)


def test_no_overlap_at_all() -> None:
    index, overlap, count = nearest_by_overlap(torch.arange(12).view(4, 3), 2)
    assert (index == -1).all() and (overlap == 0).all() and (count == 0).all()
    index, _, _ = nearest_by_overlap(torch.full((3, 2), -1), 2)
    assert (index == -1).all()

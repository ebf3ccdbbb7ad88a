"""Which units see the same images: overlap of top-k image sets, for "nearest units" lists.

Each unit is a set of image ids (its top-k hits; -1 marks an empty slot). Two units' overlap is the Jaccard
index |A ∩ B| / |A ∪ B| of their sets. Counting goes through images, not unit pairs: a sparse (U, N)
incidence matrix times its transpose, so the cost grows with the pairs that share an image, not with U².
"""

from __future__ import annotations

import warnings

import torch


def nearest_by_overlap(image_sets: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of U units, the `n` other units whose image sets overlap most.

    image_sets: (U, k) int64 image ids per unit, -1 for empty slots; duplicates within a row count once.
    Returns (U, n) unit indices, (U, n) Jaccard overlaps and (U, n) shared-image counts, best first; ties go to
    the lower unit index; slots beyond a unit's overlapping units hold index -1, overlap 0 and count 0.
    """
    units, _ = image_sets.shape
    rows = torch.arange(units).unsqueeze(1).expand_as(image_sets)  # (U, k)
    valid = image_sets >= 0
    pairs = torch.unique(torch.stack([rows[valid], image_sets[valid]]), dim=1)  # (2, E) each (unit, image) once
    size = torch.bincount(pairs[0], minlength=units)  # (U,) distinct images per unit
    if pairs.shape[1] == 0 or n == 0:
        empty = torch.full((units, n), -1, dtype=torch.int64)
        return empty, torch.zeros(units, n), torch.zeros(units, n, dtype=torch.int64)
    _, image_index = torch.unique(pairs[1], return_inverse=True)  # compact image ids
    with warnings.catch_warnings():  # sparse mm is stable here; torch warns that CSR (used inside) is beta
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        incidence = torch.sparse_coo_tensor(torch.stack([pairs[0], image_index]),
                                            torch.ones(pairs.shape[1], dtype=torch.float64),
                                            (units, int(image_index.max()) + 1), check_invariants=False).coalesce()
        shared = torch.sparse.mm(incidence, incidence.t()).coalesce()  # (U, U) shared-image counts, sparse
    a, b = shared.indices()
    count = shared.values().round().long()
    keep = a != b
    a, b, count = a[keep], b[keep], count[keep]
    jaccard = count.double() / (size[a] + size[b] - count).double()
    # Sort by (unit, -jaccard, other unit) with stable sorts, last key first, then take each unit's first n.
    order = torch.argsort(b, stable=True)
    order = order[torch.argsort(-jaccard[order], stable=True)]
    order = order[torch.argsort(a[order], stable=True)]
    a, b, count, jaccard = a[order], b[order], count[order], jaccard[order]
    starts = torch.searchsorted(a, torch.arange(units))  # first pair of each unit
    rank = torch.arange(a.numel()) - starts[a]  # position of each pair within its unit's run
    take = rank < n
    index = torch.full((units, n), -1, dtype=torch.int64)
    overlap = torch.zeros(units, n, dtype=torch.float64)
    shared_count = torch.zeros(units, n, dtype=torch.int64)
    index[a[take], rank[take]] = b[take]
    overlap[a[take], rank[take]] = jaccard[take]
    shared_count[a[take], rank[take]] = count[take]
    return index, overlap.float(), shared_count

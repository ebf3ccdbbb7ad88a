"""Cosine vector search against numpy brute force, IVF calibration, file round trips and user errors."""

from __future__ import annotations

from pathlib import Path

import faiss
import h5py
import numpy as np
import pytest

from actindex.indexer.similarity import (
    SimilarityIndex,
    StoredVectors,
    build_vector_index,
    choose_factory,
    normalize,
    read_vector_index,
    search,
    write_vector_index,
)
from actindex.kernels.errors import UserError

NAN_ROWS = (3, 17)
ZERO_ROW = 11


def random_vectors(n: int = 300, dim: int = 24, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 with two unreadable (NaN) rows and one zero row."""
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    x[list(NAN_ROWS)] = np.nan
    x[ZERO_ROW] = 0
    return x


def mixture(n: int, dim: int, clusters: int, seed: int, draw_seed: int | None = None) -> np.ndarray:
    """Gaussian mixture, non-negative means like post-ReLU activations; `draw_seed` draws other points."""
    rng = np.random.default_rng(seed)
    means = np.abs(rng.normal(size=(clusters, dim))) * 2
    if draw_seed is not None:
        rng = np.random.default_rng(draw_seed)
    return (means[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def brute_force(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k over the valid rows of x, in float64: (scores, ids)."""
    valid = np.isfinite(x).all(axis=1) & (x != 0).any(axis=1)
    with np.errstate(invalid="ignore"):  # the zero row: 0 / 0, masked below
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ unit.astype(np.float64).T  # (Q, N)
    scores[:, ~valid] = -np.inf
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_flat_search_equals_numpy_brute_force() -> None:
    x = random_vectors()
    index, info = build_vector_index(x)
    assert info.factory == "IDMap2,Flat" and info.nprobe is None and info.recall_at_10 is None
    assert info.count == len(x) - 3 and info.dim == 24
    queries = np.random.default_rng(1).normal(size=(20, 24)).astype(np.float32)
    scores, ids = search(index, queries, 10)
    expected_scores, expected_ids = brute_force(x, queries, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == ids.shape == (20, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-5)


def test_every_vector_finds_itself_first_and_invalid_rows_never_come_back() -> None:
    x = random_vectors()
    index, _ = build_vector_index(x)
    scores, ids = search(index, x, len(x))  # k = N: asks for more than the index holds
    valid = [i for i in range(len(x)) if i not in (*NAN_ROWS, ZERO_ROW)]
    np.testing.assert_array_equal(ids[valid, 0], valid)
    np.testing.assert_allclose(scores[valid, 0], 1, atol=1e-5)
    returned = ids[ids >= 0]
    assert not np.isin(returned, [*NAN_ROWS, ZERO_ROW]).any()
    assert not np.isnan(scores).any()
    # Padding: 297 vectors for k = 300; invalid query rows get nothing.
    assert (ids[valid, -3:] == -1).all() and np.isneginf(scores[valid, -3:]).all()
    assert (ids[[*NAN_ROWS, ZERO_ROW]] == -1).all()


def test_ivf_reaches_target_recall_and_keeps_nprobe_through_a_file(tmp_path: Path) -> None:
    x = mixture(20_000, 64, clusters=200, seed=0)
    index, info = build_vector_index(x, "IVF64,Flat", target_recall=0.95)
    assert info.factory == "IVF64,Flat" and info.count == 20_000
    assert info.nprobe is not None and 1 <= info.nprobe <= 64
    assert info.recall_at_10 is not None and info.recall_at_10 >= 0.95

    # Independent check on fresh points from the same mixture, against numpy brute force.
    queries = mixture(300, 64, clusters=200, seed=0, draw_seed=99)
    _, expected = brute_force(x, queries, 10)
    _, found = SimilarityIndex(index, StoredVectors(x), info.rerank).search(queries, 10)
    recall = np.mean([len(np.intersect1d(f, e)) / 10 for f, e in zip(found, expected, strict=True)])
    assert recall >= 0.93  # the calibration sample's estimate, with room for sampling noise

    write_vector_index(index, tmp_path / "v.faiss")
    loaded = read_vector_index(tmp_path / "v.faiss")
    assert faiss.extract_index_ivf(loaded).nprobe == info.nprobe
    np.testing.assert_array_equal(SimilarityIndex(loaded, StoredVectors(x), info.rerank).search(queries, 10)[1], found)


def test_choose_factory_thresholds() -> None:
    assert choose_factory(10_000, 512) == "Flat"
    assert choose_factory(1500, 100_000) == "Flat"  # too few to train an IVF
    assert choose_factory(100_000, 512) == "PCAR256,IVF1024,PQ128x4fs"
    assert choose_factory(1_281_167, 2048) == "PCAR256,IVF1024,PQ128x4fs"  # ImageNet: 82 MB of codes
    assert choose_factory(1_000_000, 200) == "IVF1024,PQ100x4fs"  # no rotation below 256 dimensions
    assert choose_factory(1_000_000, 201) == "IVF1024,PQ201x4fs"  # odd: one dimension per code
    assert choose_factory(50_000, 512) == "PCAR256,IVF1024,PQ128x4fs"
    for n in (10_000_000, 100_000_000, 1_000_000_000):  # codes and ids stay within 4 GB as long as they can
        factory = choose_factory(n, 2048)
        m = int(factory.split(",PQ")[1].split("x")[0])
        assert 256 % m == 0 and (n * (m // 2 + 8) <= 4 << 30 or m == 8), (n, factory)
    assert choose_factory(100_000_000, 2048).endswith(",PQ64x4fs")


def test_write_read_round_trip_and_file_errors(tmp_path: Path) -> None:
    x = random_vectors()
    index, _ = build_vector_index(x)
    path = tmp_path / "v.faiss"
    write_vector_index(index, path)
    assert [p.name for p in tmp_path.iterdir()] == ["v.faiss"]  # no temporary left behind
    loaded = read_vector_index(path)
    for a, b in zip(search(index, x[:50], 7), search(loaded, x[:50], 7), strict=True):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(UserError, match="not found") as missing:
        read_vector_index(tmp_path / "nope.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not a faiss index at all")
    with pytest.raises(UserError, match="not a readable FAISS index") as junk:
        read_vector_index(tmp_path / "junk.faiss")
    for error in (missing, junk):
        assert "\n" not in str(error.value)


def test_bad_factory_no_vectors_and_dimension_mismatch() -> None:
    x = random_vectors()
    with pytest.raises(UserError, match="bad index factory 'IVFx,Flat': could not parse") as bad:
        build_vector_index(x, "IVFx,Flat")
    assert "\n" not in str(bad.value) and "index_factory.cpp" not in str(bad.value)
    with pytest.raises(UserError, match="none of the 4 vectors"):
        build_vector_index(np.array([[np.nan] * 3, [0, 0, 0]] * 2, dtype=np.float32))
    with pytest.raises(UserError, match="needs at least 64 vectors"):
        build_vector_index(x[:40], "IVF64,Flat")
    index, _ = build_vector_index(x)
    with pytest.raises(UserError, match="the query has 512 dimensions, the index 24"):
        search(index, np.ones((1, 512), dtype=np.float32), 5)


def test_h5py_dataset_read_in_blocks_equals_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import actindex.indexer.similarity as vectors

    monkeypatch.setattr(vectors, "_BLOCK_BYTES", 4 * 64 * 37)  # 37 rows a block: many blocks, a ragged last one
    x = mixture(3000, 64, clusters=30, seed=2)
    x[[5, 500, 2999]] = np.nan
    with h5py.File(tmp_path / "e.h5", "w") as h5:
        h5.create_dataset("embeddings/layer4", data=x, chunks=(50, 64))
    calls: list[tuple[str, int, int]] = []
    with h5py.File(tmp_path / "e.h5", "r") as h5:
        from_h5, info_h5 = build_vector_index(h5["embeddings/layer4"], "IVF16,Flat",
                                              progress=lambda *call: calls.append(call))
    from_np, info_np = build_vector_index(x, "IVF16,Flat")
    assert (info_h5.count, info_h5.nprobe, info_h5.recall_at_10) == (info_np.count, info_np.nprobe,
                                                                       info_np.recall_at_10)
    for a, b in zip(search(from_h5, x[:100], 10), search(from_np, x[:100], 10), strict=True):
        np.testing.assert_array_equal(a, b)

    # Progress: two passes over the 3000 rows, each counted to 3000 (not 6000 "vectors" for 3000), one call per
    # block, `done` increasing to `total`.
    blocks = -(-3000 // 37)
    assert [stage for stage, _, _ in calls] == ["sampling"] * blocks + ["adding"] * blocks
    for stage in ("sampling", "adding"):
        done = [d for s, d, _ in calls if s == stage]
        assert done == sorted(done) and len(set(done)) == len(done) and done[-1] == 3000
    assert {t for _, _, t in calls} == {3000}


def test_normalize_keeps_zero_rows_and_scales_the_rest() -> None:
    x = np.array([[3, 4], [0, 0]], dtype=np.float32)
    np.testing.assert_allclose(normalize(x), [[0.6, 0.8], [0, 0]])
    assert x[0, 0] == 3  # input untouched


def test_the_default_index_re_ranks_exactly_on_the_stored_vectors(tmp_path: Path) -> None:
    """The size rule's compact candidate search (PCA, IVF, 4-bit codes) with exact re-ranking: held-out
    queries find brute force's neighbours, with brute force's scores; read back from a contiguous HDF5 dataset
    opened read-only (one pread per row) it answers the same."""
    x = mixture(40_000, 512, clusters=400, seed=5)  # 80 MB: past the exact regime
    x[[7, 99]] = np.nan
    index, info = build_vector_index(x)
    assert info.factory == "PCAR256,IVF833,PQ128x4fs" and info.rerank > 1 and info.nprobe is not None  # 48 rows a list
    assert info.recall_at_10 is not None and info.recall_at_10 >= 0.95 and info.note == ""
    queries = mixture(200, 512, clusters=400, seed=5, draw_seed=7)
    expected_scores, expected = brute_force(x, queries, 10)
    scores, found = SimilarityIndex(index, StoredVectors(x), info.rerank).search(queries, 10)
    recall = np.mean([len(np.intersect1d(f, e)) / 10 for f, e in zip(found, expected, strict=True)])
    assert recall >= 0.95
    same = found == expected  # where the ids agree, the scores are the exact cosines
    np.testing.assert_allclose(scores[same], expected_scores[same], rtol=0, atol=1e-5)
    with h5py.File(tmp_path / "e.h5", "w") as h5:
        h5.create_dataset("v", data=x, dtype="<f4")
    with h5py.File(tmp_path / "e.h5", "r") as h5:
        stored = StoredVectors(h5["v"])
        assert stored._fd is not None  # contiguous and read-only: rows by pread
        np.testing.assert_array_equal(stored.rows(np.array([5, 3, 5])), x[[5, 3, 5]])
        from_file = SimilarityIndex(index, stored, info.rerank).search(queries, 10)
        stored.close()
    np.testing.assert_array_equal(from_file[1], found)


def test_a_target_the_codes_cannot_reach_is_said_with_what_to_do() -> None:
    x = mixture(20_000, 64, clusters=20, seed=6)
    _, info = build_vector_index(x, "IVF16,PQ1x4fs")  # one 4-bit code for 64 dimensions
    assert info.recall_at_10 is not None and info.recall_at_10 < 0.95
    assert info.rerank == 64  # the deepest re-ranking, as good as it gets
    assert "below the target 0.95" in info.note and "twice as many PQ sub-quantizers" in info.note
    assert "--factory Flat: 5 MB in memory" in info.note


def test_refined_fast_scan_ivf_gets_ids_and_a_calibrated_nprobe(tmp_path: Path) -> None:
    x = mixture(4000, 32, clusters=40, seed=3)
    index, info = build_vector_index(x, "IVF16,PQ16x4fs,RFlat")
    assert info.factory == "IDMap2,IVF16,PQ16x4fs,RFlat"  # Refine has no add_with_ids: wrapped
    assert info.nprobe is not None and info.recall_at_10 is not None and info.recall_at_10 >= 0.95
    scores, ids = SimilarityIndex(index, StoredVectors(x), info.rerank).search(x[:20], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(20))
    write_vector_index(index, tmp_path / "v.faiss")
    assert faiss.extract_index_ivf(read_vector_index(tmp_path / "v.faiss")).nprobe == info.nprobe

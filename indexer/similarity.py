"""The FAISS index over per-image activation vectors, searched by cosine similarity, and its file beside an index:
one writer (`write_vector_index`), one reader (`open_vector_index`, which checks the file against its index).

Conventions:
  * Input is an (N, D) float32 array or h5py dataset (`/embeddings/<layer>` of an actindex index), read
    `_BLOCK_BYTES` at a time, never whole. Row number = image id = FAISS id, so results need no id table.
  * Rows with a NaN or infinity (images that could not be read are all-NaN) and all-zero rows (no direction,
    so no cosine) are left out of the index and can never be returned.
  * Cosine similarity = inner product of L2-normalized vectors: the index uses METRIC_INNER_PRODUCT and every
    vector, indexed or queried, goes through `normalize`. Scores are cosines in [-1, 1].
  * Missing results (fewer than k indexed vectors, or an invalid query row) come back as id -1, score -inf;
    nothing returned is NaN.
  * An approximate (IVF) index carries its calibrated `nprobe` inside the file, so a reader needs no settings.

Building an approximate index reads the input twice: pass 1 finds the valid rows and draws a seeded uniform
sample of them (training rows + held-out calibration queries); pass 2 adds every valid row and, for the
calibration queries, keeps an exact top-k over the same blocks, so exact ground truth costs no third pass.

The file beside an index: `INDEX.h5` keeps its per-image vectors in `/embeddings/<layer>`; `INDEX.faiss`, in the
same folder, indexes one of them (FAISS ids are image ids). The HDF5 root attributes name it by its path
relative to the HDF5 file's folder (`faiss_index`), with the layer, factory string, nprobe and measured recall
(`FaissRecord`), so that the pair can be moved together and a stale or foreign FAISS file is refused.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import faiss
import h5py
import numpy as np

from actindex.kernels.errors import UserError

from .atomic import atomic_path
from .index_file import PATCH_PREFIX, FaissRecord, IndexReader

_BLOCK_BYTES = 64 << 20  # rows read per block: 64 MB of float32, e.g. 32768 rows of 512
_CALIBRATION_K = 10  # recall@10 is what the user sees on a result page
_CALIBRATION_QUERIES = 500
_RECALL_MARGIN = 0.01  # the sample's recall is an estimate: aim a little above the target
_TRAIN_PER_LIST = 64  # k-means sample per IVF list: faiss wants 39..256; the low end keeps training short
_TRAIN_OTHER = 65536  # sample for non-IVF trained indexes (PQ / SQ codebooks: 256 centroids x 256 points)
# Candidates re-ranked exactly per result asked for, tried by the calibration: 10 to 640 for recall@10.
_RERANK_FACTORS = (1, 2, 4, 8, 16, 32, 64)
_USER_REFINE_K_FACTOR = 16
_FEW_QUERIES = 8  # searched with one thread (`_threads_for`)
# The calibration's cost of a search, in units of one 4-bit code scanned: re-ranking a candidate reads and
# multiplies its D floats, which costs about 0.6 D codes' scan (docs/BENCHMARKS.md, similarity search).
_CANDIDATE_COST_PER_DIM = 0.6

# choose_factory's thresholds, explained in its docstring.
_FLAT_MAX_FLOATS = 16 << 20  # 64 MB of float32: the most one exact (brute-force) query may scan
_FLAT_MIN_ROWS = 2000  # below this an IVF has too few points per list to train on
_REDUCED_DIM = 256  # vectors are PCA-rotated and cut to this many dimensions for the candidate search
_MEMORY_BUDGET = 4 << 30  # bytes the codes (and their ids) of an index may keep in RAM
_KMEANS_BUDGET = _TRAIN_PER_LIST * 1024 * 1024 * 512  # train rows x lists x dim per k-means iteration


class VectorSource(Protocol):
    """An (N, D) array or h5py dataset: `.shape` and row slicing."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, rows: Any) -> Any: ...


@dataclass(frozen=True)
class VectorIndexInfo:
    factory: str  # faiss index_factory string actually used, e.g. "IDMap2,Flat" or "PCAR256,IVF1024,PQ128x4fs"
    nprobe: int | None  # IVF indexes: the calibrated value, saved inside the index file
    rerank: int  # candidates re-ranked exactly on the stored vectors per result asked for; 1: none (exact index)
    count: int  # vectors added
    dim: int
    recall_at_10: float | None  # approximate indexes: on held-out sample queries against exact search
    seconds: float  # build time
    note: str = ""  # when the calibration could not reach the target recall: what it reached and what to do


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as a new (N, D) float32 array; zero rows stay zero, NaN rows stay NaN."""
    x = np.array(x, dtype=np.float32, ndmin=2)  # copy: callers keep their array
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _valid_rows(block: np.ndarray) -> np.ndarray:
    """(B,) bool: finite and not all zero."""
    return np.isfinite(block).all(axis=1) & (block != 0).any(axis=1)


def choose_factory(n: int, dim: int, max_bytes: int | None = None, memory: int = _MEMORY_BUDGET) -> str:
    """The index for n vectors of dim dimensions: exact while one query may scan them all, else a compact
    candidate search whose candidates are re-ranked exactly on the stored vectors (`SimilarityIndex`). The
    latency, recall, memory and build time each regime reaches are measured by scripts/bench_search.py and
    scripts/bench_scale.py (docs/BENCHMARKS.md); the rule for 10M and 100M vectors is worked out there.

    * Exact ("Flat") while the vectors take at most 64 MB (n * dim <= 16 Mi floats, e.g. 32k x 512 or 8k x
      2048) or n < 2000 (too few points to train an IVF).
    * Otherwise: a PCA rotation to at most 256 dimensions ("PCAR256", only when dim is larger), an IVF with
      nlist = the power of two nearest 4 * sqrt(n), capped so that k-means costs at most 64 * 1024^2 * 512
      multiply-adds per iteration (1.28M -> IVF1024), and 4-bit fast-scan PQ codes of 2 dimensions each
      ("PQ128x4fs": 64 bytes a vector, scanned in SIMD registers), with half as many sub-quantizers, each
      twice as wide, as long as codes and ids would pass `memory` (4 GB: 100M -> PQ64x4fs) or a vector's code
      and its 8-byte id would pass `max_bytes` (patch vectors: 64 -> PQ64x4fs, 40 bytes, within 16 GB).
    Candidates come from the codes; the answer from the stored float32 vectors, so scores are exact cosines and
    recall is limited only by how many candidates are re-ranked (calibrated, with nprobe, at build time).
    """
    if n * dim <= _FLAT_MAX_FLOATS or n < _FLAT_MIN_ROWS:
        return "Flat"
    reduced = min(dim, _REDUCED_DIM)
    nlist = 2 ** round(np.log2(4 * np.sqrt(n)))
    while nlist > 16 and _TRAIN_PER_LIST * nlist * nlist * reduced > _KMEANS_BUDGET:
        nlist //= 2
    # faiss wants >= 39 training points per list; 48 a list leaves room for the held-out calibration queries and
    # for rows that cannot be indexed (zero vectors are common among patch vectors)
    nlist = min(nlist, max(16, n // 48))
    m = reduced // 2 if reduced % 2 == 0 else reduced  # 4-bit codes of 2 dimensions (1 when odd)
    while m % 2 == 0 and m > 8 and (n * (m // 2 + 8) > memory or  # code bytes + an 8-byte id a vector
                                    (max_bytes is not None and m // 2 + 8 > max_bytes)):
        m //= 2
    rotation = f"PCAR{reduced}," if reduced < dim else ""
    return f"{rotation}IVF{nlist},PQ{m}x4fs"


Progress = Callable[[str, int, int], None]  # (stage, rows done, rows in all): "sampling", then "adding"


def build_vector_index(vectors: VectorSource, factory: str | None = None,
                       progress: Progress | None = None, target_recall: float = 0.95,
                       seed: int = 0) -> tuple[faiss.Index, VectorIndexInfo]:
    """Index the valid rows of `vectors` (ids = row numbers) for cosine search; see the module docstring.

    `factory` defaults to `choose_factory`. Approximate indexes train on a seeded sample of valid rows, and are
    calibrated on held-out sample queries against exact search: the cheapest power-of-two nprobe and re-rank
    depth (`SimilarityIndex`) whose recall@10 reaches `target_recall` + 0.01; when none does, the best one, with
    a note saying so and what to do. `progress(stage, done, total)` counts the rows read by each pass over the
    vectors: "sampling" (approximate indexes only), then "adding"; total is the number of rows.
    """
    start_time = time.perf_counter()
    if len(vectors.shape) != 2:
        raise UserError(f"vectors must be a 2-D (images, dimensions) array, not shape {tuple(vectors.shape)}")
    n, dim = int(vectors.shape[0]), int(vectors.shape[1])
    if n == 0 or dim == 0:
        raise UserError(f"there are no vectors to index (shape {n} x {dim})")
    index, factory = _make_index(factory or choose_factory(n, dim), dim)
    exact = _is_exact(index)
    ivf = _ivf(index)
    block = max(1, _BLOCK_BYTES // (4 * dim))
    meter = _Progress(progress, n)

    queries: np.ndarray | None = None  # (Q, D) normalized held-out calibration queries
    query_ids: np.ndarray | None = None  # (Q,) their row numbers
    if not exact:
        sample_size = _TRAIN_PER_LIST * ivf.nlist if ivf is not None else _TRAIN_OTHER
        meter.begin("sampling")
        sample_ids, sample = _sample_valid_rows(vectors, block, sample_size + _CALIBRATION_QUERIES, seed, meter)
        if len(sample_ids) == 0:
            raise UserError(_no_valid_vectors(n))
        q = min(_CALIBRATION_QUERIES, len(sample_ids) // 5)
        query_ids, queries = sample_ids[:q], sample[:q]
        _train(index, ivf, factory, sample[q:] if q else sample, seed)

    exact_top = None if queries is None or query_ids is None else _ExactTopK(queries, query_ids, _CALIBRATION_K)
    count = 0
    meter.begin("adding")
    for a in range(0, n, block):
        rows = _read(vectors, a, min(n, a + block))  # (B, D)
        ok = _valid_rows(rows)
        ids = np.flatnonzero(ok).astype(np.int64) + a
        if len(ids):
            unit = normalize(rows[ok])
            index.add_with_ids(unit, ids)
            if exact_top is not None:
                exact_top.add(unit, ids)
            count += len(ids)
        meter.advance(len(rows))
    if count == 0:
        raise UserError(_no_valid_vectors(n))

    nprobe: int | None = int(ivf.nprobe) if ivf is not None else None
    rerank, recall, note = 1, None, ""
    if exact_top is not None and len(exact_top.query_ids):
        goal = target_recall + _RECALL_MARGIN
        nprobe, rerank, recall = _calibrate(index, ivf, StoredVectors(vectors), exact_top, goal, count)
        if recall < target_recall:
            note = _not_reached(recall, target_recall, factory, rerank, n, dim)
    info = VectorIndexInfo(factory=factory, nprobe=nprobe, rerank=rerank, count=count, dim=dim,
                           recall_at_10=recall, seconds=time.perf_counter() - start_time, note=note)
    return index, info


def write_vector_index(index: faiss.Index, path: Path) -> None:
    """Write under a temporary name in the same folder, fsync, rename: readers never see half a file."""
    try:
        with atomic_path(Path(path), durable=True) as tmp:
            faiss.write_index(index, str(tmp))
    except (RuntimeError, OSError) as error:
        raise UserError(f"cannot write vector index '{path}': {_faiss_message(error)}") from error


def read_vector_index(path: Path) -> faiss.Index:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"vector index '{path}' not found; build it first, or check the path")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as error:
        raise UserError(f"'{path}' is not a readable FAISS index ({_faiss_message(error)}); rebuild it") from error


class StoredVectors:
    """Rows of an (N, D) array or HDF5 dataset by id, without reading the whole matrix: the exact copy that an
    approximate index's candidates are re-ranked on. A contiguous float32 dataset of a file opened read-only
    (what a build writes) is read with one `pread` per row at its offset in the file (float16 patch vectors
    too); anything else through h5py (or numpy) indexing. Rows come back as float32."""

    def __init__(self, vectors: VectorSource) -> None:
        self.vectors = vectors
        self.dim = int(vectors.shape[1])
        self._fd: int | None = None
        self._offset = 0
        self._dtype = np.dtype("<f4")
        if isinstance(vectors, h5py.Dataset) and vectors.file.mode == "r" and vectors.chunks is None \
                and vectors.compression is None and vectors.dtype in (np.dtype("<f4"), np.dtype("<f2")):
            offset = vectors.id.get_offset()
            if offset is not None:
                self._fd, self._offset = os.open(vectors.file.filename, os.O_RDONLY), int(offset)
                self._dtype = vectors.dtype

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), D) float32: the rows of `ids` (valid ids, in any order, repeats allowed), in that order."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._fd is not None:
            dtype = self._dtype
            size = dtype.itemsize * self.dim
            data = b"".join(os.pread(self._fd, size, self._offset + int(i) * size) for i in ids)
            return np.frombuffer(data, dtype=dtype).reshape(len(ids), self.dim).astype(np.float32, copy=False)
        order, unique = np.unique(ids, return_inverse=True)  # h5py reads increasing ids only
        return np.asarray(self.vectors[order], dtype=np.float32)[unique] if len(ids) else \
            np.zeros((0, self.dim), dtype=np.float32)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class SimilarityIndex:
    """A FAISS index searched by cosine: its candidates (`rerank` per result asked for) re-ranked exactly on the
    stored vectors, so scores are exact cosines and the codes only need to find the candidates."""

    index: faiss.Index
    stored: StoredVectors | None = None  # None, or rerank 1: the index's own scores (exact for Flat)
    rerank: int = 1
    layer: str = ""  # the embedding layer it indexes

    @property
    def d(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k: (Q, D) queries -> (scores (Q, k) float32, ids (Q, k) int64), best first, ties to the lower id;
        padded with id -1 and score -inf as `search` is."""
        if self.stored is None or self.rerank <= 1:
            return search(self.index, queries, k)
        found_scores, found_ids = search(self.index, queries, min(k * self.rerank, max(k, self.index.ntotal)))
        scores = np.full((len(found_ids), k), -np.inf, dtype=np.float32)
        ids = np.full((len(found_ids), k), -1, dtype=np.int64)
        unit = normalize(np.array(queries, dtype=np.float32, ndmin=2))
        for row, (candidates, query) in enumerate(zip(found_ids, unit, strict=True)):
            candidates = candidates[candidates >= 0]
            if len(candidates):
                exact = normalize(self.stored.rows(candidates)) @ query  # (C,)
                order = np.lexsort((candidates, -exact))[:k]
                scores[row, :len(order)], ids[row, :len(order)] = exact[order], candidates[order]
        return scores, ids

    def close(self) -> None:
        if self.stored is not None:
            self.stored.close()


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by the index's own scores (cosines): (Q, D) queries -> (scores (Q, k) float32, ids (Q, k) int64),
    best first. Fewer than k results (small index, NaN or zero query row) are padded with id -1 and score -inf.
    """
    q = np.array(queries, dtype=np.float32, ndmin=2)  # (Q, D)
    if q.ndim != 2:
        raise UserError(f"queries must be a 2-D (queries, dimensions) array, not shape {q.shape}")
    if q.shape[1] != index.d:
        raise UserError(f"the query has {q.shape[1]} dimensions, the index {index.d}: query with vectors of the "
                        "layer the index was built from")
    if k < 1:
        raise UserError(f"k must be at least 1, not {k}")
    ok = _valid_rows(q)
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids = np.full((len(q), k), -1, dtype=np.int64)
    if ok.any():
        with _threads_for(int(ok.sum())):
            found_scores, found_ids = index.search(normalize(q[ok]), k)
        found_scores[found_ids < 0] = -np.inf  # faiss pads with -1 ids and -FLT_MAX / NaN scores
        scores[ok], ids[ok] = found_scores, found_ids
    return scores, ids


@contextmanager
def _threads_for(queries: int) -> Iterator[None]:
    """One OpenMP thread for a handful of queries, faiss's default for batches. A single query gains nothing
    from more threads, and their waiting spins take the CPU from the caller: measured on 2 cores, a one-query
    fast-scan search for 320 candidates took 4.8 ms with 2 threads and 0.1 ms with 1 (docs/BENCHMARKS.md)."""
    if queries > _FEW_QUERIES:
        yield
        return
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


# --- building blocks ------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, callback: Progress | None, total: int) -> None:
        self.callback, self.total, self.done, self.stage = callback, total, 0, ""

    def begin(self, stage: str) -> None:
        self.stage, self.done = stage, 0

    def advance(self, rows: int) -> None:
        self.done += rows
        if self.callback is not None:
            self.callback(self.stage, self.done, self.total)


def _read(vectors: VectorSource, a: int, b: int) -> np.ndarray:
    return np.asarray(vectors[a:b], dtype=np.float32)


def check_factory(factory: str, dim: int) -> None:
    """Raise UserError now for a factory string faiss rejects, rather than after hours of indexing."""
    _make_index(factory, dim)


def _make_index(factory: str, dim: int) -> tuple[faiss.Index, str]:
    """The empty index and the factory string that makes it; adds an id map where the index has no ids."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise UserError(f"bad index factory '{factory}': {_faiss_message(error)}") from error
    # An IVF, alone or behind a transform, keeps ids itself; Flat, HNSW, Refine(…) etc. need an id map.
    refine = isinstance(index, faiss.IndexRefine)
    if refine:  # a factory's own refinement ('…,RFlat') re-ranks 16 k candidates, not faiss's default k
        cast(Any, index).k_factor = _USER_REFINE_K_FACTOR
    if _ivf(index) is None and not isinstance(index, faiss.IndexIDMap) or refine:
        index = faiss.IndexIDMap2(index)
        factory = "IDMap2," + factory
    return index, factory


def _ivf(index: faiss.Index) -> Any:
    """The IndexIVF inside `index` (through id maps and transforms), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _is_exact(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return isinstance(inner, faiss.IndexFlat)


def _faiss_message(error: BaseException) -> str:
    """faiss's message on one line, without its C++ function signature and source location."""
    text = " ".join(str(error).split())  # faiss puts the message after the location, on the next line
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    return re.sub(r"^Error: '.*?' failed: ", "", text)


def _no_valid_vectors(n: int) -> str:
    return (f"none of the {n} vectors can be indexed (all are NaN, i.e. unreadable images, or zero); "
            "check the index's skipped images")


def _sample_valid_rows(vectors: VectorSource, block: int, size: int, seed: int, meter: _Progress,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A seeded uniform sample of up to `size` valid rows, in one pass: (ids (S,), normalized rows (S, D)).

    Every row gets a random key; the sample is the valid rows with the smallest keys. Candidates are kept in
    a buffer compacted to `size` when it passes 2 * size, whose largest key then filters later blocks.
    """
    n = vectors.shape[0]
    keys = np.random.default_rng(seed).random(n)  # (N,)
    cand_keys: list[np.ndarray] = []
    cand_ids: list[np.ndarray] = []
    cand_rows: list[np.ndarray] = []
    held, threshold = 0, np.inf
    for a in range(0, n, block):
        rows = _read(vectors, a, min(n, a + block))
        take = _valid_rows(rows) & (keys[a:a + len(rows)] < threshold)
        if take.any():
            cand_keys.append(keys[a:a + len(rows)][take])
            cand_ids.append(np.flatnonzero(take) + a)
            cand_rows.append(normalize(rows[take]))
            held += int(take.sum())
        if held > 2 * size:
            cand_keys, cand_ids, cand_rows, threshold = _keep_smallest(cand_keys, cand_ids, cand_rows, size)
            held = size
        meter.advance(len(rows))
    if not cand_keys:
        return np.zeros(0, dtype=np.int64), np.zeros((0, vectors.shape[1]), dtype=np.float32)
    cand_keys, cand_ids, cand_rows, _ = _keep_smallest(cand_keys, cand_ids, cand_rows, size)
    order = np.argsort(cand_keys[0], kind="stable")  # random order: any prefix is a uniform sample too
    return cand_ids[0][order].astype(np.int64), cand_rows[0][order]


def _keep_smallest(keys: list[np.ndarray], ids: list[np.ndarray], rows: list[np.ndarray], size: int,
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], float]:
    all_keys, all_ids, all_rows = np.concatenate(keys), np.concatenate(ids), np.concatenate(rows)
    if len(all_keys) > size:
        keep = np.argpartition(all_keys, size - 1)[:size]
        all_keys, all_ids, all_rows = all_keys[keep], all_ids[keep], all_rows[keep]
    threshold = float(all_keys.max()) if len(all_keys) >= size else np.inf
    return [all_keys], [all_ids], [all_rows], threshold


def _train(index: faiss.Index, ivf: Any, factory: str, sample: np.ndarray, seed: int) -> None:
    if ivf is not None:
        ivf.cp.seed = seed
        # The sample is already the size we want: stop faiss from subsampling it again (and warning).
        ivf.cp.max_points_per_centroid = max(256, len(sample) // max(1, ivf.nlist) + 1)
        if len(sample) < ivf.nlist:
            raise UserError(f"index factory '{factory}' needs at least {ivf.nlist} vectors to train its "
                            f"{ivf.nlist} lists, there are {len(sample)}; use 'Flat' or fewer lists")
    try:
        index.train(np.ascontiguousarray(sample))
    except RuntimeError as error:
        raise UserError(f"cannot train index '{factory}' on {len(sample)} vectors: "
                        f"{_faiss_message(error)}") from error


class _ExactTopK:
    """Exact top-k of fixed queries over blocks of indexed vectors (the query's own row excluded)."""

    def __init__(self, queries: np.ndarray, query_ids: np.ndarray, k: int) -> None:
        self.queries, self.query_ids, self.k = queries, query_ids, k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), k), -1, dtype=np.int64)

    def add(self, unit: np.ndarray, ids: np.ndarray) -> None:
        scores = self.queries @ unit.T  # (Q, D) x (D, B) -> (Q, B)
        scores[self.query_ids[:, None] == ids[None, :]] = -np.inf  # a query finding itself proves nothing
        both_scores = np.concatenate([self.scores, scores], axis=1)  # (Q, k + B)
        both_ids = np.concatenate([self.ids, np.broadcast_to(ids, scores.shape)], axis=1)
        top = np.argpartition(-both_scores, min(self.k, both_scores.shape[1] - 1), axis=1)[:, :self.k]
        self.scores = np.take_along_axis(both_scores, top, axis=1)
        self.ids = np.take_along_axis(both_ids, top, axis=1)

    def result(self) -> np.ndarray:
        """(Q, k) ids, -1 where fewer than k other vectors exist."""
        return np.where(np.isfinite(self.scores), self.ids, -1)


def _calibrate(index: faiss.Index, ivf: Any, stored: StoredVectors, sample: _ExactTopK, goal: float,
               count: int) -> tuple[int | None, int, float]:
    """The cheapest (nprobe, re-rank factor) whose recall@10 on the sample queries reaches `goal`, or the one with
    the best recall when none does; nprobe is left set in the index. Returns (nprobe, factor, recall).

    Each nprobe (powers of two up to nlist; None without an IVF) is searched once for the deepest candidate list
    (640); every factor's recall comes from that list's first 10·factor candidates, re-ranked on their exact
    scores, which are read once per query and kept. Cost: nprobe lists of codes scanned, plus the candidates.
    """
    k, truth = sample.k, sample.result()
    deepest = min(k * _RERANK_FACTORS[-1], count)
    probes: list[int | None] = [None]
    if ivf is not None:
        probes = [1 << p for p in range(int(np.log2(ivf.nlist)) + 1)]
        probes[-1] = int(ivf.nlist)
    known: list[dict[int, float]] = [{} for _ in range(len(sample.query_ids))]
    best: tuple[float, float, int | None, int] | None = None  # (-recall or cost, …) chosen so far
    reached: list[tuple[float, int | None, int, float]] = []  # (cost, nprobe, factor, recall)
    for nprobe in probes:
        if ivf is not None:
            ivf.nprobe = nprobe
        _, found = index.search(sample.queries, deepest + 1)  # (Q, deepest + 1): the query itself may be in it
        hits = np.zeros(len(_RERANK_FACTORS))
        expected = 0
        for row, (candidates, own, wanted, query) in enumerate(zip(found, sample.query_ids, truth, sample.queries,
                                                                   strict=True)):
            candidates = candidates[(candidates >= 0) & (candidates != own)]
            missing = [int(i) for i in candidates if int(i) not in known[row]]
            if missing:
                exact = normalize(stored.rows(np.array(missing))) @ query
                known[row].update(zip(missing, exact.tolist(), strict=True))
            wanted = wanted[wanted >= 0]
            expected += len(wanted)
            for f, factor in enumerate(_RERANK_FACTORS):
                head = candidates[:k * factor]
                scores = np.array([known[row][int(i)] for i in head])
                top = head[np.lexsort((head, -scores))[:k]] if len(head) else head
                hits[f] += len(np.intersect1d(top, wanted))
        scanned = (nprobe or 0) * count / (ivf.nlist if ivf is not None else 1)
        for f, factor in enumerate(_RERANK_FACTORS):
            recall = float(hits[f] / expected) if expected else 1.0
            cost = scanned + _CANDIDATE_COST_PER_DIM * stored.dim * k * factor
            if recall >= goal:
                reached.append((cost, nprobe, factor, recall))
            if best is None or (recall, -cost) > (best[0], best[1]):
                best = (recall, -cost, nprobe, factor)
        if hits[-1] == expected:  # every neighbour found: more lists cannot do better
            break
    assert best is not None
    _, nprobe, factor, recall = min(reached) if reached else (0.0, best[2], best[3], best[0])
    if ivf is not None and nprobe is not None:
        ivf.nprobe = nprobe
    return nprobe, factor, recall


def _not_reached(recall: float, target: float, factory: str, rerank: int, n: int, dim: int) -> str:
    larger = "without the PCA rotation (drop 'PCARnnn,')" if "PCAR" in factory else \
        "twice as many PQ sub-quantizers"
    raw = n * dim * 4
    size = f"{raw / 1e9:.1f} GB" if raw >= 1e9 else f"{raw / 1e6:.0f} MB"
    return (f"recall@10 {recall:.3f} is below the target {target:.2f} even at the best calibration ({10 * rerank} "
            f"candidates re-ranked exactly per 10 results): '{factory}' cannot tell these vectors' neighbours "
            f"apart; rebuild it (actindex faiss INDEX --factory …) {larger}, or exact (--factory Flat: {size} in "
            "memory)")


# --- the file beside an index -----------------------------------------------------------------------------

NONE = "none"  # --faiss-factory none: no FAISS file


def vector_index_path(index: Path) -> Path:
    """INDEX.h5 -> INDEX.faiss beside it."""
    return index.with_name(index.stem + ".faiss")


def index_for(dataset: h5py.Dataset, index: Path, factory: str | None,
              progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    """The FAISS index of `dataset`, in memory, and the attributes `index` records about its file. The caller
    writes it with `write_vector_index(…, vector_index_path(index))` before the HDF5 file takes its place, so
    that a complete index never names a missing FAISS file."""
    vectors, info = build_vector_index(dataset, factory, progress)
    return vectors, attributes(info, str(dataset.name).rsplit("/", 1)[-1], vector_index_path(index))


def attributes(info: VectorIndexInfo, layer: str, final: Path, prefix: str = "faiss") -> dict[str, Any]:
    return FaissRecord(final.name, layer, info.factory, info.nprobe, info.count, info.recall_at_10, info.rerank,
                       info.note).to_attrs(prefix)


PATCH_BYTES = 64  # the most a patch vector's code and id may take in a FAISS index
# Patch vectors are many (ImageNet at 14 x 14: 251M): 40 bytes each is 10 GB, which the 4 GB of an image index
# would cut to 16 bytes, too few to find neighbours (docs/BENCHMARKS.md, patch search).
PATCH_MEMORY = 16 << 30
PATCH_RECALL = 0.9  # recall@10 the calibration aims at: patch hits are thinned to a few per image anyway


def patch_index_path(index: Path) -> Path:
    """INDEX.h5 -> INDEX.patches.faiss beside it."""
    return index.with_name(index.stem + ".patches.faiss")


def patch_index_for(dataset: h5py.Dataset, index: Path, factory: str | None,
                    progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    """The FAISS index over the (N * H * W, C) patch vectors `dataset` (ids = row numbers = `LayerGrid.ids`), and
    the `patch_faiss_*` attributes of its file; written like `index_for`'s. The default factory keeps each
    vector's code and id within `PATCH_BYTES`."""
    n, dim = int(dataset.shape[0]), int(dataset.shape[1])
    vectors, info = build_vector_index(dataset, factory or choose_factory(n, dim, PATCH_BYTES, PATCH_MEMORY),
                                       progress, PATCH_RECALL)
    layer = str(dataset.name).rsplit("/", 1)[-1]
    return vectors, attributes(info, layer, patch_index_path(index), PATCH_PREFIX)


def open_vector_index(reader: IndexReader, layer: str | None = None, patches: bool = False) -> SimilarityIndex:
    """The similarity index of the open index `reader` for `layer` (default: the one recorded), checked against its
    stored vectors, which it re-ranks on: keep `reader` open while searching. With `patches`, the patch vectors'
    index (`INDEX.patches.faiss`, over `/patches/<layer>`)."""
    info = reader.info
    index = info.path
    record, path = (info.patch_faiss, info.patch_faiss_path) if patches else (info.faiss, info.faiss_path)
    what, option = ("patch index", " --patches") if patches else ("FAISS index", "")
    if patches:
        reader.patch_grid(layer or info.patch_layer)  # an index without patch vectors: say how to get them
    if record is None or path is None:
        raise UserError(f"'{index}' has no {what}; build one with: actindex faiss {index}{option}")
    if layer is not None and layer != record.layer:
        raise UserError(f"the {what} of '{index}' was built from layer '{record.layer}', not '{layer}'; "
                        f"rebuild it with: actindex faiss {index}{option} --layer {layer}")
    if not path.is_file():
        raise UserError(f"the {what} '{path}' named by '{index}' is missing; rebuild it with: "
                        f"actindex faiss {index}{option}")
    stored = reader.patches(record.layer) if patches else reader.embeddings(record.layer)
    dim = int(stored.shape[1])
    vectors = read_vector_index(path)
    if vectors.d != dim or vectors.ntotal != record.count:
        raise UserError(f"'{path}' does not belong to '{index}' ({vectors.ntotal} vectors of {vectors.d} "
                        f"dimensions, the index's '{record.layer}' has {dim}); rebuild it with: actindex faiss "
                        f"{index}{option}")
    return SimilarityIndex(vectors, StoredVectors(stored) if record.rerank > 1 else None, record.rerank,
                           record.layer)


def require_vectors(reader: Any) -> None:
    """Raise a UserError that says how to get vectors when the index (an open `IndexReader`) stores none."""
    if not reader.embedding_names:
        raise UserError(f"'{reader.path}' stores no per-image vectors, so it cannot be searched by similarity: it "
                        "was built with --embed-layer ''. Build it again without that option (the vectors of the "
                        "last indexed layer are stored) or with --embed-layer LAYER")


def rebuild(index: Path, layer: str | None = None, factory: str | None = None,
            progress: Progress | None = None) -> tuple[Path, VectorIndexInfo, str]:
    """`actindex faiss`: (re)build the FAISS file of `index` from its stored vectors, without the network."""

    with IndexReader(index) as reader:
        require_vectors(reader)
        names = reader.embedding_names
        recorded = reader.info
        chosen = layer or (recorded.faiss.layer if recorded.faiss else "") or recorded.embed_layer or names[0]
        dataset = reader.embeddings(chosen)  # not_found lists the layers with vectors
        vectors, info = build_vector_index(dataset, factory, progress)
    final = vector_index_path(index)
    write_vector_index(vectors, final)
    with h5py.File(index, "r+") as h5:  # a few small attributes, rewritten in place
        for key, value in attributes(info, chosen, final).items():
            h5.attrs[key] = value
    return final, info, chosen


def rebuild_patches(index: Path, layer: str | None = None, factory: str | None = None,
                    progress: Progress | None = None) -> tuple[Path, VectorIndexInfo, str]:
    """`actindex faiss --patches`: (re)build the patch vectors' FAISS file of `index`, without the network."""
    with IndexReader(index) as reader:
        chosen = layer or reader.info.patch_layer or (reader.patch_names or [""])[0]
        dataset = reader.patches(chosen)  # a one-line error without patch vectors, or for another layer
        n, dim = int(dataset.shape[0]), int(dataset.shape[1])
        vectors, info = build_vector_index(dataset, factory or choose_factory(n, dim, PATCH_BYTES, PATCH_MEMORY),
                                           progress, PATCH_RECALL)
    final = patch_index_path(index)
    write_vector_index(vectors, final)
    with h5py.File(index, "r+") as h5:  # a few small attributes, rewritten in place
        for key, value in attributes(info, chosen, final, PATCH_PREFIX).items():
            h5.attrs[key] = value
    return final, info, chosen

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

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import h5py
import numpy as np

from actindex.kernels.errors import UserError

from .atomic import atomic_path
from .index_file import FaissRecord, IndexInfo, IndexReader

_BLOCK_BYTES = 64 << 20  # rows read per block: 64 MB of float32, e.g. 32768 rows of 512
_CALIBRATION_K = 10  # recall@10 is what the user sees on a result page
_CALIBRATION_QUERIES = 500
_RECALL_MARGIN = 0.01  # the sample's recall is an estimate: aim a little above the target
_TRAIN_PER_LIST = 64  # k-means sample per IVF list: faiss wants 39..256; the low end keeps training short
_REFINE_K_FACTOR = 16  # Refine(…) re-ranks 16 k candidates exactly; 4 k loses recall at 1M (docs/BENCHMARKS.md)
_TRAIN_OTHER = 65536  # sample for non-IVF trained indexes (PQ / SQ codebooks: 256 centroids x 256 points)

# choose_factory's thresholds, explained in its docstring.
_FLAT_MAX_FLOATS = 16 << 20  # 64 MB of float32: the most one exact (brute-force) query may scan
_FLAT_MIN_ROWS = 2000  # below this an IVF has too few points per list to train on
_IVF_FLAT_MAX_FLOATS = 64 << 20  # 256 MB of raw vectors in IVF lists; beyond, lists hold fast-scan PQ codes
_MEMORY_BUDGET = 4 << 30  # bytes of vector codes an index may keep in RAM
_KMEANS_BUDGET = _TRAIN_PER_LIST * 1024 * 1024 * 512  # train rows x lists x dim per k-means iteration


class VectorSource(Protocol):
    """An (N, D) array or h5py dataset: `.shape` and row slicing."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, rows: slice) -> Any: ...


@dataclass(frozen=True)
class VectorIndexInfo:
    factory: str  # faiss index_factory string actually used, e.g. "IDMap2,Flat" or "IVF1024,Flat"
    nprobe: int | None  # IVF indexes: the calibrated value, saved inside the index file
    count: int  # vectors added
    dim: int
    recall_at_10: float | None  # approximate indexes: on held-out sample queries against exact search
    seconds: float  # build time


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as a new (N, D) float32 array; zero rows stay zero, NaN rows stay NaN."""
    x = np.array(x, dtype=np.float32, ndmin=2)  # copy: callers keep their array
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _valid_rows(block: np.ndarray) -> np.ndarray:
    """(B,) bool: finite and not all zero."""
    return np.isfinite(block).all(axis=1) & (block != 0).any(axis=1)


def choose_factory(n: int, dim: int) -> str:
    """The index for n vectors of dim dimensions, chosen so that one query scans little memory. The latency and
    recall each regime reaches are measured by scripts/bench_search.py (docs/BENCHMARKS.md).

    * Exact ("Flat") while the vectors take at most 64 MB (n * dim <= 16 Mi floats, e.g. 32k x 512 or 8k x
      2048) or n < 2000 (too few points to train an IVF).
    * Otherwise IVF with nlist = the power of two nearest 4 * sqrt(n), capped so that k-means costs at most
      64 * 1024^2 * 512 multiply-adds per iteration (64 training points per list): 1024 lists at 512
      dimensions (1M x 512 -> IVF1024), 512 at 2048. 100k -> IVF1024.
    * Codes, by what one query must scan:
      - raw float32 ("Flat") while n * dim <= 64 Mi floats (256 MB);
      - while the raw vectors fit in 4 GB (n * dim * 4 <= 4 GB, 1M x 512 = 2 GB): 4-bit fast-scan PQ with 2
        dimensions per code ("PQ{dim/2}x4fs", 1/16 of the bytes, scanned in SIMD registers) re-ranked exactly
        on the raw vectors ("RFlat", 16 k candidates), which keeps the recall of IVF-Flat at a tenth of its
        scan;
      - 8-bit scalar quantization ("SQ8", 1 byte per dimension) while n * dim <= 4 GB (ImageNet, 1.28M x
        2048 = 10.5 GB raw -> 2.6 GB);
      - beyond that product quantization "PQm" with m bytes per vector, the largest divisor of dim that is at
        most dim / 2 and keeps n * m <= 4 GB.
    """
    if n * dim <= _FLAT_MAX_FLOATS or n < _FLAT_MIN_ROWS:
        return "Flat"
    nlist = 2 ** round(np.log2(4 * np.sqrt(n)))
    while nlist > 16 and _TRAIN_PER_LIST * nlist * nlist * dim > _KMEANS_BUDGET:
        nlist //= 2
    nlist = min(nlist, max(16, n // 39))  # faiss wants >= 39 training points per list
    if n * dim <= _IVF_FLAT_MAX_FLOATS or (dim % 2 and n * dim * 4 <= _MEMORY_BUDGET):
        codes = "Flat"
    elif n * dim * 4 <= _MEMORY_BUDGET:
        codes = f"PQ{dim // 2}x4fs,RFlat"
    elif n * dim <= _MEMORY_BUDGET:
        codes = "SQ8"
    else:
        limit = min(dim // 2, max(1, _MEMORY_BUDGET // n))
        m = max(d for d in range(1, limit + 1) if dim % d == 0)
        codes = f"PQ{m}"
    return f"IVF{nlist},{codes}"


Progress = Callable[[str, int, int], None]  # (stage, rows done, rows in all): "sampling", then "adding"


def build_vector_index(vectors: VectorSource, factory: str | None = None,
                       progress: Progress | None = None, target_recall: float = 0.95,
                       seed: int = 0) -> tuple[faiss.Index, VectorIndexInfo]:
    """Index the valid rows of `vectors` (ids = row numbers) for cosine search; see the module docstring.

    `factory` defaults to `choose_factory`. Approximate indexes train on a seeded sample of valid rows;
    IVF indexes get the smallest power-of-two nprobe whose recall@10 on held-out sample queries reaches
    `target_recall` + 0.01 (or nlist, if none does). `progress(stage, done, total)` counts the rows read by each
    pass over the vectors: "sampling" (approximate indexes only), then "adding"; total is the number of rows.
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

    nprobe: int | None = None
    recall: float | None = None
    if exact_top is not None and len(exact_top.query_ids):
        truth = exact_top.result()
        if ivf is not None:
            nprobe, recall = _calibrate_nprobe(index, ivf, exact_top, truth, target_recall + _RECALL_MARGIN)
        else:
            recall = _recall(index, exact_top.queries, exact_top.query_ids, truth)
    elif ivf is not None:
        nprobe = int(ivf.nprobe)
    info = VectorIndexInfo(factory=factory, nprobe=nprobe, count=count, dim=dim, recall_at_10=recall,
                           seconds=time.perf_counter() - start_time)
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


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by cosine: (Q, D) queries -> (scores (Q, k) float32, ids (Q, k) int64), best first.

    Fewer than k results (small index, NaN or zero query row) are padded with id -1 and score -inf.
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
        found_scores, found_ids = index.search(normalize(q[ok]), k)
        found_scores[found_ids < 0] = -np.inf  # faiss pads with -1 ids and -FLT_MAX / NaN scores
        scores[ok], ids[ok] = found_scores, found_ids
    return scores, ids


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
    if not isinstance(index, (faiss.IndexIVF, faiss.IndexIDMap)):  # IndexIDMap2 derives from IndexIDMap
        index = faiss.IndexIDMap2(index)  # Flat, HNSW, Refine(IVF…) etc. have no add_with_ids of their own
        factory = "IDMap2," + factory
    refine = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else None
    if isinstance(refine, faiss.IndexRefine):
        refine.k_factor = _REFINE_K_FACTOR
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


def _recall(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k (self excluded) that the index returns in its top-k (self excluded)."""
    k = truth.shape[1]
    _, found = index.search(queries, k + 1)  # (Q, k + 1): one extra, for the query's own row
    hits = 0
    expected = 0
    for row, own, exact in zip(found, query_ids, truth, strict=True):
        others = row[(row != own) & (row >= 0)][:k]
        wanted = exact[exact >= 0]
        hits += len(np.intersect1d(others, wanted))
        expected += len(wanted)
    return hits / expected if expected else 1.0


def _calibrate_nprobe(index: faiss.Index, ivf: Any, sample: _ExactTopK, truth: np.ndarray, goal: float,
                      ) -> tuple[int, float]:
    """Set and return the smallest power-of-two nprobe reaching `goal` recall (nlist if none does)."""
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        recall = _recall(index, sample.queries, sample.query_ids, truth)
        if recall >= goal or nprobe >= ivf.nlist:
            return nprobe, recall
        nprobe = min(2 * nprobe, ivf.nlist)


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


def attributes(info: VectorIndexInfo, layer: str, final: Path) -> dict[str, Any]:
    return FaissRecord(final.name, layer, info.factory, info.nprobe, info.count, info.recall_at_10).to_attrs()


def open_vector_index(info: IndexInfo, layer: str | None, dim: int) -> tuple[Any, str]:
    """The FAISS index of the index `info` describes, for `layer` (default: the one recorded), checked against
    its HDF5 file's vectors of `dim` dimensions. Returns it and the layer it indexes."""
    index, record, path = info.path, info.faiss, info.faiss_path
    if record is None or path is None:
        raise UserError(f"'{index}' has no FAISS index; build one with: actindex faiss {index}")
    if layer is not None and layer != record.layer:
        raise UserError(f"the FAISS index of '{index}' was built from layer '{record.layer}', not '{layer}'; "
                        f"rebuild it with: actindex faiss {index} --layer {layer}")
    if not path.is_file():
        raise UserError(f"the FAISS index '{path}' named by '{index}' is missing; rebuild it with: "
                        f"actindex faiss {index}")
    vectors = read_vector_index(path)
    if vectors.d != dim or vectors.ntotal != record.count:
        raise UserError(f"'{path}' does not belong to '{index}' ({vectors.ntotal} vectors of {vectors.d} "
                        f"dimensions, the index's '{record.layer}' has {dim}); rebuild it with: actindex faiss "
                        f"{index}")
    return vectors, record.layer


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
